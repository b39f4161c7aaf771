import json

import numpy as np
import pytest

from raycache.encoder import Encoder, EncoderError, pool


def test_default_encoder_vectors_are_unit_float32(encoder):
    vecs = encoder.encode(["What is the capital of France?", "hi", ""], batch_size=2)
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_encode_order_independent_of_length_bucketing(encoder):
    texts = ["short", "a much longer prompt about the boiling point of water at sea level", "mid length one"]
    together = encoder.encode(texts, batch_size=2)
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_paraphrase_closer_than_unrelated(encoder):
    a, b, c = encoder.encode(["How tall is Mount Everest?", "What is the height of Mount Everest?",
                              "Recipe for banana bread"])
    assert a @ b > a @ c + 0.3


def test_save_load_round_trip_and_sentence_transformers(encoder, tmp_path):
    out = encoder.save(tmp_path / "m")
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    texts = ["round trip", "another prompt"]
    again = Encoder.load(out, device="cpu")
    np.testing.assert_allclose(again.encode(texts), encoder.encode(texts), atol=1e-6)
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(model.encode(texts, normalize_embeddings=True), encoder.encode(texts), atol=1e-5)


def test_missing_folder_and_offline_hub_id_errors(tmp_path):
    with pytest.raises(EncoderError, match="not found"):
        Encoder.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="not a loadable"):
        Encoder.load(str(tmp_path / "empty"))
    with pytest.raises(EncoderError, match="could not be loaded"):
        Encoder.load("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1 in conftest


def test_pooling_modes():
    import torch

    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 4.0]]
