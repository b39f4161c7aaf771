"""Ray Train runs of ``raycache train`` on tiny data: 2-worker gloo DDP, --resume, a lost worker.

Each run is 64 training pairs at max_length 16 so the file stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raycache.config import ConfigError, TrainConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> dict[str, str]:
    """64 training and 32 validation pairs from the default generator (disjoint groups)."""
    from raycache.data import write_table
    from raycache.workload import generate_pairs, generate_prompts

    prompts = generate_prompts(seed=0)
    folder = tmp_path_factory.mktemp("pairs")
    paths = {}
    for split, n, seed in (("train", 64, 0), ("test", 32, 1)):
        pairs = generate_pairs(prompts[prompts["split"] == split], n, seed=seed)
        paths[split] = str(folder / f"{split}.jsonl")
        write_table(pairs, paths[split])
    return paths


def _config(pair_files, out: Path, **overrides) -> TrainConfig:
    base = dict(pairs=pair_files["train"], val_pairs=pair_files["test"], out=str(out), epochs=1,
                batch_size=16, encoder={"max_length": 16, "batch_size": 32}, use_ray_data=False)
    return TrainConfig(**(base | overrides))


def _metrics(out: Path) -> dict:
    return json.loads((out / "train_metrics.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(ray_local, pair_files, tmp_path_factory) -> tuple[Path, dict]:
    """One epoch on 2 CPU workers (gloo DDP) fed by Ray Data: (output folder, run summary)."""
    from raycache.training.job import run

    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, run(_config(pair_files, out, workers=2, use_ray_data=True))


def test_two_worker_gloo_ddp_writes_a_loadable_model_folder(ddp_run, encoder):
    from transformers import AutoModel

    from raycache.encoder import Encoder
    from raycache.training import SimilarityHead

    out, summary = ddp_run
    metrics = _metrics(out)
    (epoch,) = metrics["epochs"]
    assert metrics["workers"] == 2 and epoch["pairs"] == 64  # two shards of 32
    assert epoch["pairs_per_s"] > 0 and np.isfinite(epoch["train_loss"])
    assert 0.0 <= metrics["base"]["auc"] <= 1.0 and 0.0 <= epoch["val_auc"] <= 1.0
    assert summary["best_val_auc"] == epoch["val_auc"]
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model_dir = out / "model"
    assert {"config.json", "modules.json", "similarity_head.json"} <= {p.name for p in model_dir.iterdir()}
    assert (model_dir / "1_Pooling" / "config.json").exists()
    assert SimilarityHead.load(model_dir).as_dict()["scale"] > 0
    tuned = Encoder.load(model_dir, device="cpu")
    texts = ["What is the capital of France?", "Who wrote Hamlet?"]
    vecs = tuned.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vecs, encoder.encode(texts), atol=1e-4)  # the weights did change
    assert AutoModel.from_pretrained(model_dir).config.hidden_size == vecs.shape[1]


def test_the_model_folder_loads_in_sentence_transformers(ddp_run):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from raycache.encoder import Encoder

    model_dir = ddp_run[0] / "model"
    texts = ["What is the capital of France?", "Who wrote Hamlet?"]
    st_vecs = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu").encode(texts)
    np.testing.assert_allclose(st_vecs, Encoder.load(model_dir, device="cpu").encode(texts), atol=1e-5)


def test_resume_continues_a_stopped_run_from_its_latest_checkpoint(ray_local, pair_files, tmp_path):
    from raycache.training.job import run

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no checkpoints to continue from"):
        run(_config(pair_files, out, resume=True))
    run(_config(pair_files, out, epochs=1))
    first = _metrics(out)

    run(_config(pair_files, out, epochs=2, resume=True))
    resumed = _metrics(out)
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    assert resumed["epochs"][0] == first["epochs"][0]  # epoch 1 was not trained again
    assert resumed["base"] == first["base"]
    assert resumed["resumed_from_epochs"] == [1]


def _crash_once_after_first_checkpoint(marker: Path, snapshot: Path):
    """A train loop whose first attempt dies (os._exit) once epoch 1's checkpoint is registered.

    Built in a function so cloudpickle ships it to the workers by value.
    """

    def loop(loop_config):
        import os
        import time

        import ray.train

        from raycache.training.loop import train_loop_per_worker

        report = ray.train.report

        def report_then_crash(*args, **kwargs):
            report(*args, **kwargs)
            if marker.exists():
                return
            deadline = time.monotonic() + 120  # until the controller has recorded the checkpoint
            while time.monotonic() < deadline and "epoch_001" not in (
                    snapshot.read_text() if snapshot.exists() else ""):
                time.sleep(0.2)
            marker.write_text("crashed")
            os._exit(1)

        ray.train.report = report_then_crash
        try:
            train_loop_per_worker(loop_config)
        finally:
            ray.train.report = report

    return loop


def test_a_lost_worker_restarts_from_the_last_checkpoint(ray_local, pair_files, tmp_path):
    from raycache.training.job import SNAPSHOT_FILE, run

    out = tmp_path / "run"
    marker = tmp_path / "crashed"
    loop = _crash_once_after_first_checkpoint(marker, out / "checkpoints" / SNAPSHOT_FILE)
    run(_config(pair_files, out, val_pairs=None, epochs=2, max_failures=1), train_loop=loop)

    assert marker.exists()  # the first worker did die
    metrics = _metrics(out)
    assert metrics["resumed_from_epochs"] == [1]
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert (out / "model" / "similarity_head.json").exists()
