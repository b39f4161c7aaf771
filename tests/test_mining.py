import numpy as np
import pandas as pd
import pytest

from raycache import mining
from raycache.config import MineConfig


def test_knn_pairs_dedup_and_no_self():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    i, j, s = mining.knn_pairs(v, k=3)
    assert (i < j).all()
    assert len(set(zip(i.tolist(), j.tolist()))) == len(i)
    np.testing.assert_allclose(s, np.einsum("ij,ij->i", v[i], v[j]), atol=1e-5)
    # every item's true nearest neighbour is among the pairs
    sims = v @ v.T
    np.fill_diagonal(sims, -2)
    nn = sims.argmax(1)
    pairs = set(zip(i.tolist(), j.tolist()))
    assert all((min(a, b), max(a, b)) in pairs for a, b in enumerate(nn))


def test_random_pairs_distinct_and_exclusion():
    rng = np.random.default_rng(1)
    i, j = mining.random_pairs(10, 40, rng, exclude={(0, 1)})
    got = set(zip(i.tolist(), j.tolist()))
    assert len(got) == 40 and (0, 1) not in got and all(a < b for a, b in got)
    i, j = mining.random_pairs(4, 100, rng)  # capped at all 6 pairs
    assert len(i) == 6


@pytest.mark.ray
def test_mine_run_on_local_ray(ray_local, tmp_path):
    from raycache.data import read_pairs

    prompts = pd.DataFrame({
        "prompt": [f"What is the capital of country {c}?" for c in "ABCDEFGHIJ"]
        + [f"Which city is the capital of country {c}?" for c in "ABCDEFGHIJ"],
        "group": [f"cap:{c}" for c in "ABCDEFGHIJ"] * 2,
        "answers": [[f"city {c}"] for c in "ABCDEFGHIJ"] * 2,
    })
    src = tmp_path / "prompts.jsonl"
    prompts.to_json(src, orient="records", lines=True)
    out = tmp_path / "pairs.parquet"
    summary = mining.run(MineConfig(prompts=str(src), out=str(out), k=2, random_per_prompt=0.5))
    pairs = read_pairs(out)
    assert summary["pairs"] == len(pairs) and summary["prompts"] == 20
    assert {"group_a", "group_b", "answers_a", "answers_b", "similarity", "pair_id"} <= set(pairs.columns)
    assert (pairs.prompt_a != pairs.prompt_b).all()
    assert pairs.pair_id.is_unique
    assert set(pairs.source) == {"knn", "random"}
    knn = pairs[pairs.source == "knn"]
    assert (knn.group_a == knn.group_b).any()  # the paraphrase of each question is a near neighbour


@pytest.mark.ray
def test_collect_embeddings_across_blocks_keeps_rows_aligned(ray_local):
    import ray

    from raycache.ray_embed import collect_embeddings

    items = [{"prompt": f"p{i}", "answers": [f"a{i}", "x"] if i % 3 else None, "group": f"g{i % 7}"}
             for i in range(600)]

    def fake_embed(batch):
        batch["embedding"] = np.stack([np.full(4, float(p[1:]), np.float32) for p in batch["prompt"]])
        return batch

    ds = ray.data.from_items(items, override_num_blocks=4).map_batches(fake_embed, batch_format="numpy",
                                                                        batch_size=100)
    frame, vecs = collect_embeddings(ds)
    assert len(frame) == 600 and vecs.shape == (600, 4)
    assert [float(p[1:]) for p in frame["prompt"]] == vecs[:, 0].tolist()
    row = frame.set_index("prompt").loc["p4"]
    assert list(row["answers"]) == ["a4", "x"] and row["group"] == "g4"
