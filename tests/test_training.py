"""Unit tests of the training pieces that need no Ray: losses, similarity head, schedule, sharding."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raycache.config import TrainConfig
from raycache.training import BCELoss, PairScorer, SimilarityHead, SLDLoss, build_loss
from raycache.training.loop import in_memory_batches, linear_warmup_decay, steps_per_epoch


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _loss_and_grad(loss_fn, logits, targets):
    z = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    loss = loss_fn(z, torch.tensor(targets, dtype=torch.float32))
    loss.backward()
    return float(loss.detach()), z.grad.numpy()


# ----------------------------------------------------------------------------- losses


def test_bce_matches_the_formula_and_its_gradient_at_soft_targets():
    logits, targets = [0.0, 2.0, -1.0, 0.7], [0.5, 1.0, 0.2, 0.9]
    loss, grad = _loss_and_grad(BCELoss(), logits, targets)
    by_hand = np.mean([-(y * math.log(_sigmoid(z)) + (1 - y) * math.log(1 - _sigmoid(z)))
                       for z, y in zip(logits, targets)])
    assert loss == pytest.approx(by_hand, rel=1e-6)
    # dL/dz_i = (sigmoid(z_i) - y_i) / n
    expected = [(_sigmoid(z) - y) / len(logits) for z, y in zip(logits, targets)]
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    assert grad[0] == pytest.approx(0.0, abs=1e-7)  # P = y = 0.5 is the optimum


def test_bce_stays_finite_for_saturated_logits():
    loss, grad = _loss_and_grad(BCELoss(), [100.0, -100.0], [0.0, 1.0])
    assert loss == pytest.approx(100.0, rel=1e-5)
    np.testing.assert_allclose(grad, [0.5, -0.5], rtol=1e-5)


def test_sld_matches_the_formula_and_its_gradient():
    eps = 0.01
    logits, targets = [0.0, 1.0, -2.0, 0.5], [0.5, 1.0, 0.0, 0.3]
    loss, grad = _loss_and_grad(SLDLoss(eps), logits, targets)
    # y clipped to [eps, 1 - eps]: hard labels target ±log(99)
    target_logits = [0.0, math.log(99.0), -math.log(99.0), math.log(0.3 / 0.7)]
    diffs = [z - t for z, t in zip(logits, target_logits)]
    assert loss == pytest.approx(np.mean(np.square(diffs)), rel=1e-6)
    np.testing.assert_allclose(grad, [2 * d / len(logits) for d in diffs], rtol=1e-5)


def test_sld_is_zero_where_the_log_odds_match_the_soft_target():
    targets = [0.2, 0.5, 0.9]
    logits = [math.log(y / (1 - y)) for y in targets]
    loss, grad = _loss_and_grad(SLDLoss(0.01), logits, targets)
    assert loss == pytest.approx(0.0, abs=1e-10)
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)


def test_sld_eps_sets_the_clip():
    _, grad_small = _loss_and_grad(SLDLoss(0.01), [0.0], [1.0])
    _, grad_large = _loss_and_grad(SLDLoss(0.1), [0.0], [1.0])
    assert grad_small[0] == pytest.approx(-2 * math.log(99.0), rel=1e-5)
    assert grad_large[0] == pytest.approx(-2 * math.log(9.0), rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.5, -0.1])
def test_sld_rejects_eps_outside_0_to_half(eps):
    with pytest.raises(ValueError, match="eps"):
        SLDLoss(eps)


@pytest.mark.parametrize("loss", [BCELoss(), SLDLoss()])
def test_losses_reject_mismatched_shapes(loss):
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.zeros(3), torch.zeros(4))


def test_build_loss():
    assert isinstance(build_loss("bce"), BCELoss)
    sld = build_loss("sld", sld_eps=0.05)
    assert isinstance(sld, SLDLoss) and sld.eps == 0.05
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        build_loss("mse")


# ----------------------------------------------------------------------------- head


def test_head_computes_cos_over_scale_minus_bias():
    head = SimilarityHead(scale=0.05, bias=14.0)
    cos = torch.tensor([0.2, 0.7, 0.9])
    np.testing.assert_allclose(head(cos).detach().numpy(), [4.0 - 14.0, 0.0, 18.0 - 14.0], atol=1e-5)
    assert float(head.probability(torch.tensor(0.7)).detach()) == pytest.approx(0.5, abs=1e-6)


def test_head_scale_stays_positive_under_steps_that_push_it_down():
    head = SimilarityHead(scale=0.1, bias=0.0)
    opt = torch.optim.Adam(head.parameters(), lr=0.5)  # steps of ~0.5: a raw λ would turn negative
    for _ in range(20):  # maximising cos / λ at cos = 1 drives λ towards 0
        loss = -head(torch.ones(4)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert 0.0 < float(head.scale.detach()) < 0.1
    assert math.isfinite(float(head(torch.ones(1)).detach()))


def test_head_defaults_come_from_the_train_config():
    cfg = TrainConfig(pairs="p", out="o")
    head = SimilarityHead(cfg.init_scale, cfg.init_bias)
    # the initial decision boundary P = 0.5 sits at cos = λ·c, in the high-similarity region where a
    # per-request false-hit budget of a few percent puts the threshold (not at MiniLM's topic level)
    assert 0.8 <= cfg.init_scale * cfg.init_bias < 0.95
    assert head.as_dict() == pytest.approx({"scale": cfg.init_scale, "bias": cfg.init_bias})


def test_head_save_load_round_trip(tmp_path):
    head = SimilarityHead(scale=0.037, bias=11.5)
    path = head.save(tmp_path / "model")
    assert path.name == "similarity_head.json"
    assert json.loads(path.read_text()) == pytest.approx({"scale": 0.037, "bias": 11.5})
    loaded = SimilarityHead.load(tmp_path / "model")
    assert loaded.as_dict() == pytest.approx(head.as_dict())


def test_head_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="similarity_head.json"):
        SimilarityHead.load(tmp_path)
    (tmp_path / "similarity_head.json").write_text('{"scale": -1, "bias": 0}')
    with pytest.raises(ValueError, match="positive"):
        SimilarityHead.load(tmp_path)
    (tmp_path / "similarity_head.json").write_text('{"scale": 0.1}')
    with pytest.raises(ValueError, match="'scale' and 'bias'"):
        SimilarityHead.load(tmp_path)


def test_pair_scorer_cosine_matches_the_encoder(encoder):
    scorer = PairScorer(encoder, SimilarityHead(0.05, 14.0))
    a = ["What is the capital of France?", "Who wrote Hamlet?"]
    b = ["what's France's capital city", "What is the capital of France?"]
    with torch.no_grad():
        cos = scorer.cosine(a, b).numpy()
        logits = scorer(a, b).numpy()
    va, vb = encoder.encode(a), encoder.encode(b)
    np.testing.assert_allclose(cos, (va * vb).sum(axis=1), atol=1e-4)
    np.testing.assert_allclose(logits, cos / 0.05 - 14.0, atol=1e-3)
    assert cos[0] > cos[1]
    with pytest.raises(ValueError, match="2 prompts_a but 1 prompts_b"):
        scorer.cosine(a, b[:1])


# ----------------------------------------------------------------------------- schedule, shards


def test_linear_warmup_then_decay():
    factor = linear_warmup_decay(total_steps=100, warmup_ratio=0.1)
    values = [factor(s) for s in range(100)]
    assert values[0] < values[5] < values[9] < values[10] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(1 / 90)  # (total - step) / (total - warmup)
    assert linear_warmup_decay(10, 0.0)(0) == pytest.approx(1.0)


def test_in_memory_shards_are_equal_disjoint_and_reshuffled_per_epoch():
    n, world = 103, 2
    rows = {"prompt_a": [f"a{i}" for i in range(n)], "prompt_b": [f"b{i}" for i in range(n)],
            "label": [float(i % 2) for i in range(n)]}
    cfg = TrainConfig(pairs="p", out="o", batch_size=16)

    def shard(rank, epoch):
        return [a for batch_a, _, _ in in_memory_batches(rows, cfg, epoch, rank, world) for a in batch_a]

    s0, s1 = shard(0, 1), shard(1, 1)
    assert len(s0) == len(s1) == n // world  # equal steps on every worker, or DDP would hang
    assert not set(s0) & set(s1)
    assert shard(0, 2) != s0 and shard(0, 1) == s0
    batches = list(in_memory_batches(rows, cfg, 1, 0, world))
    assert len(batches) == steps_per_epoch(n, world, cfg.batch_size) == 4
    a, b, y = batches[0]
    assert [int(x[1:]) for x in a] == [int(x[1:]) for x in b] and y.dtype == np.float32


# ----------------------------------------------------------------------------- job input checks


def test_labelled_pairs_keeps_labelled_rows_and_names_a_missing_label():
    import pandas as pd

    from raycache.config import ConfigError
    from raycache.training.job import labelled_pairs

    df = pd.DataFrame({"prompt_a": ["a", "b", "c"], "prompt_b": ["d", "e", "f"],
                       "label": [1.0, float("nan"), 0.25], "group_a": ["x", "y", "z"]})
    out = labelled_pairs(df)
    assert list(out.columns) == ["prompt_a", "prompt_b", "label"]
    assert out["prompt_a"].tolist() == ["a", "c"] and out["label"].tolist() == [1.0, 0.25]
    with pytest.raises(ConfigError, match="no 'label' column"):
        labelled_pairs(df.drop(columns="label"))


@pytest.mark.parametrize("labels, problem", [
    ([1.0, 1.0, 0.9], "both positive and negative"),
    ([None, None, None], "no labelled pairs"),
])
def test_run_rejects_unusable_validation_pairs_before_starting_ray(tmp_path, labels, problem):
    from raycache.config import ConfigError
    from raycache.training.job import run

    rows = [{"prompt_a": f"question {i}", "prompt_b": f"query {i}", "label": y} for i, y in enumerate(labels)]
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ConfigError, match=problem):
        run(TrainConfig(pairs=str(val), val_pairs=str(val), out=str(tmp_path / "out")))
