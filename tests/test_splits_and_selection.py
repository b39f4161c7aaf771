"""Question-disjoint splits, the operating-point validation figures and the new training terms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from raycache.config import ConfigError, TrainConfig
from raycache.evaluation import retrieval_operating_point, tpr_at_fpr
from raycache.splits import assign_components, pair_components, prompt_groups, split_pairs
from raycache.training.losses import BCELoss, InBatchContrastiveLoss, SLDLoss
from raycache.training.loop import in_memory_batches, same_prompt_mask, selection_score


def test_pair_components_follow_shared_prompts():
    a = ["q1", "q2", "q3", "q5", "q6"]
    b = ["q2", "q3", "q4", "q6", "q1"]
    comps = pair_components(a, b)
    # q1-q2-q3-q4 and (via q6-q1) q5-q6 are all one chain
    assert len(set(comps.tolist())) == 1
    comps = pair_components(["x", "y", "z"], ["x2", "y2", "x"])
    assert comps[0] == comps[2] != comps[1]


def test_split_pairs_is_question_disjoint_and_near_the_fraction():
    rng = np.random.default_rng(0)
    a = [f"q{i}" for i in range(2000)]
    b = [f"q{rng.integers(0, 2000)}" for _ in range(2000)]
    a, b = a[:1000] + [f"r{i}" for i in range(1000)], b[:1000] + [f"s{i}" for i in range(1000)]
    train, held = split_pairs(a, b, 0.2, seed=3)
    assert len(train) + len(held) == 2000 and not set(train) & set(held)
    seen = {a[i] for i in train} | {b[i] for i in train}
    assert not seen & ({a[i] for i in held} | {b[i] for i in held})
    assert 0.1 < len(held) / 2000 < 0.3
    with pytest.raises(ValueError, match="connected"):
        split_pairs(["a", "b"], ["b", "a"], 0.5)


def test_split_pairs_cuts_one_giant_neighbourhood_graph_and_stays_question_disjoint():
    """Mined k-nearest-neighbour pairs form one component: the split cuts it, drops only the pairs
    across the cut, and still shares no prompt between the parts."""
    rng = np.random.default_rng(1)
    points = rng.uniform(size=(600, 2))
    a, b = [], []
    for i, p in enumerate(points):
        for j in np.argsort(np.square(points - p).sum(axis=1))[1:6]:  # each point's 5 nearest
            a.append(f"q{i}")
            b.append(f"q{j}")
    a, b = a + ["x"], b + ["y"]  # and one small component elsewhere
    assert len(set(pair_components(a, b).tolist())) <= 3
    train, held = split_pairs(a, b, 0.15, seed=2)
    assert not set(train) & set(held)
    seen = {a[i] for i in train} | {b[i] for i in train}
    assert not seen & ({a[i] for i in held} | {b[i] for i in held})
    assert 0.1 < len(held) / len(a) < 0.25
    assert len(train) + len(held) > 0.85 * len(a)  # few pairs cross the cut
    again = split_pairs(a, b, 0.15, seed=2)
    assert again[0].tolist() == train.tolist() and again[1].tolist() == held.tolist()


def test_assign_components_keeps_components_whole():
    comps = np.repeat(np.arange(50), 3)
    part = assign_components(comps, [0.6, 0.2, 0.2], seed=1)
    for c in range(50):
        assert len(set(part[comps == c].tolist())) == 1
    assert set(part.tolist()) == {0, 1, 2}


def test_prompt_groups_join_positive_pairs_only():
    prompts, groups = prompt_groups(["a", "b", "c"], ["b", "c", "d"], [1.0, 0.0, 0.9])
    g = dict(zip(prompts, groups.tolist()))
    assert g["a"] == g["b"] and g["c"] == g["d"] and g["a"] != g["c"]


def test_tpr_at_fpr_reads_the_top_of_the_roc_curve():
    neg = np.linspace(0.0, 0.99, 100)  # 100 negatives
    pos = np.array([0.995, 0.985, 0.975, 0.5])  # above the 1st, 2nd, 3rd highest negative
    s = np.concatenate([neg, pos])
    y = np.concatenate([np.zeros(100), np.ones(4)])
    got = tpr_at_fpr(s, y, fprs=(0.0, 0.01, 0.02))
    assert got == {"0": 0.25, "0.01": 0.5, "0.02": 0.75}


def test_retrieval_operating_point_counts_nearest_neighbours():
    # same-group pairs at cos 0.99 and 0.98, a cross-group pair at 0.985 between them
    v = np.array([[1, 0, 0], [0.99, 0.141, 0], [0, 1, 0], [0, 0.98, 0.199], [0, 0, 1], [0.1726, 0, 0.985]],
                 dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    groups = [0, 0, 1, 1, 2, 3]
    res = retrieval_operating_point(v, groups, deltas=(0.0, 0.34))
    assert res["0"]["correct_hit_rate"] == pytest.approx(2 / 6) and res["0"]["false_hit_rate"] == 0
    assert res["0"]["threshold"] == pytest.approx(0.99, abs=1e-3)
    assert res["0.34"]["correct_hit_rate"] == pytest.approx(4 / 6)
    assert res["0.34"]["false_hit_rate"] == pytest.approx(2 / 6)


def test_negative_weight_scales_negative_pairs():
    z = torch.tensor([2.0, 2.0])
    y = torch.tensor([1.0, 0.0])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    weighted = BCELoss(negative_weight=3.0)(z, y)
    assert weighted == pytest.approx(float((plain[0] + 3 * plain[1]) / 4))
    assert BCELoss()(z, y) == pytest.approx(float(plain.mean()))
    sq = SLDLoss(0.01, negative_weight=3.0)(z, y)
    t = torch.logit(torch.tensor([0.99, 0.01]))
    assert sq == pytest.approx(float(((z[0] - t[0]) ** 2 + 3 * (z[1] - t[1]) ** 2) / 4), rel=1e-5)
    with pytest.raises(ValueError):
        BCELoss(negative_weight=0)


def test_in_batch_contrastive_matches_its_formula_and_skips_negatives():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    y = torch.tensor([1.0, 0.0, 1.0])
    loss = InBatchContrastiveLoss(scale=5.0)(a, b, y)
    expected = []
    for i in (0, 2):
        cands = torch.cat([b, a[[j for j in range(3) if j != i]]])
        logits = 5.0 * cands @ a[i]
        expected.append(-torch.log_softmax(logits, 0)[i])
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    assert float(InBatchContrastiveLoss()(a, b, torch.zeros(3))) == 0.0


def test_same_prompt_mask_excludes_repeats_from_the_negatives():
    mask = same_prompt_mask(["x", "y", "z"], ["p", "p", "x"])
    assert mask.tolist() == [[True, True, True], [True, True, False], [False, False, True]]  # b_2 = a_0
    a = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    b = a.clone()
    b[1] = b[0]  # pair 1's answer repeats pair 0's
    with_mask = InBatchContrastiveLoss()(a, b, torch.ones(3), same_prompt_mask(["x", "y", "z"], ["p", "p", "q"]))
    without = InBatchContrastiveLoss()(a, b, torch.ones(3))
    assert float(with_mask) < float(without)


def test_length_bucketing_keeps_shards_equal_and_batches_of_similar_length():
    rng = np.random.default_rng(0)
    n = 640
    lengths = rng.integers(5, 200, size=n)
    rows = {"prompt_a": ["x" * int(k) + str(i) for i, k in enumerate(lengths)],
            "prompt_b": [f"b{i}" for i in range(n)], "label": [float(i % 2) for i in range(n)]}
    cfg = TrainConfig(pairs="p", out="o", batch_size=16, length_bucketing=True)
    plain = TrainConfig(pairs="p", out="o", batch_size=16, length_bucketing=False)

    def spread(c):
        return np.mean([max(map(len, a)) - min(map(len, a)) for a, _, _ in in_memory_batches(rows, c, 1, 0, 2)])

    shard = [x for a, _, _ in in_memory_batches(rows, cfg, 1, 0, 2) for x in a]
    other = [x for a, _, _ in in_memory_batches(rows, cfg, 1, 1, 2) for x in a]
    assert len(shard) == len(other) == n // 2 and not set(shard) & set(other)
    assert spread(cfg) < 0.3 * spread(plain)


def test_selection_score_follows_the_configured_metric():
    rec = {"val_auc": 0.9, "val_hit_at_fh": 0.1, "val_tpr_at_fpr": 0.3}
    better_auc = {"val_auc": 0.95, "val_hit_at_fh": 0.05, "val_tpr_at_fpr": 0.2}
    cfg = TrainConfig(pairs="p", out="o")
    assert cfg.select_metric == "hit_at_fh"
    assert selection_score(rec, cfg) > selection_score(better_auc, cfg)
    cfg_auc = TrainConfig(pairs="p", out="o", select_metric="auc")
    assert selection_score(rec, cfg_auc) < selection_score(better_auc, cfg_auc)


def test_max_pairs_samples_uniformly_not_the_first_rows():
    from raycache.training.job import sample_pairs

    df = pd.DataFrame({"prompt_a": [f"a{i}" for i in range(1000)], "prompt_b": [f"b{i}" for i in range(1000)],
                       "label": [1.0] * 500 + [0.0] * 500})
    got = sample_pairs(df, 100, seed=0)
    assert len(got) == 100 and 25 < got["label"].sum() < 75  # both halves represented
    assert got.equals(sample_pairs(df, 100, seed=0)) and not got.equals(sample_pairs(df, 100, seed=1))
    assert sample_pairs(df, None, 0) is df


def test_training_holds_out_a_question_disjoint_validation_part(tmp_path):
    from raycache.training.job import hold_out_validation

    df = pd.DataFrame({"prompt_a": [f"q{i}" for i in range(200)], "prompt_b": [f"p{i}" for i in range(200)],
                       "label": [float(i % 2) for i in range(200)]})
    train, val = hold_out_validation(df, TrainConfig(pairs="p", out="o", val_fraction=0.2))
    assert len(train) + len(val["label"]) == 200
    assert not (set(train["prompt_a"]) | set(train["prompt_b"])) & (set(val["prompt_a"]) | set(val["prompt_b"]))
    chain = pd.DataFrame({"prompt_a": ["a", "b", "c"], "prompt_b": ["b", "c", "a"], "label": [1.0, 0.0, 1.0]})
    with pytest.raises(ConfigError, match="question-disjoint"):
        hold_out_validation(chain, TrainConfig(pairs="p", out="o"))


def test_hard_negatives_are_near_neighbours_from_other_components():
    from raycache.training.hard_negatives import mine_hard_negatives

    pairs = pd.DataFrame({"prompt_a": ["a1", "b1", "c1"], "prompt_b": ["a2", "b2", "c2"], "label": [1.0, 1.0, 0.0]})
    vec = {"a1": [1, 0, 0], "a2": [0.9, 0.1, 0], "b1": [0.95, 0.05, 0.0], "b2": [0, 1, 0],
           "c1": [0, 0, 1], "c2": [0, 0.1, 0.9]}

    def vectors_of(texts):
        x = np.array([vec[t] for t in texts], dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    mined = mine_hard_negatives(pairs, vectors_of, per_prompt=1, min_cos=0.8)
    got = {frozenset(p) for p in zip(mined["prompt_a"], mined["prompt_b"])}
    # a1/a2 and b1 are close but unconnected; c1/c2 share a (negative) pair, so never mined together
    assert got and all(len(p & {"a1", "a2"}) == 1 and "b1" in p for p in got)
    assert (mined["label"] == 0.0).all()
    assert len(mine_hard_negatives(pairs, vectors_of, per_prompt=0, min_cos=0.8)) == 0
    assert len(mine_hard_negatives(pairs, vectors_of, per_prompt=3, min_cos=0.999)) == 0
