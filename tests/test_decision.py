"""The one decision rule (raycache.cache.decision): scalar and vectorised forms agree, the policies
and the engine answer with it, and the simulator's vectorised replay follows it where it differs
from a plain `similarity >= threshold` (an exact-tier match the threshold refuses)."""

import math

import numpy as np
import pandas as pd
import pytest

from raycache.cache.decision import EXACT_SIMILARITY, decide, exact_hit, hits, is_candidate, meets
from raycache.cache.engine import SemanticCache
from raycache.cache.policy import CalibratedThreshold, PolicyThreshold, StaticThreshold
from raycache.config import CacheConfig
from raycache.simulation import replay


def test_scalar_and_vectorised_rule_agree_on_edge_values():
    sims = np.array([0.5, 0.9, 0.90000001, 1.0, -1.0, np.nan, -np.inf, np.inf])
    thresholds = np.array([-np.inf, -1.0, 0.9, 1.0, 1.5, np.inf])
    grid = hits(sims[None, :], thresholds[:, None])
    assert grid.shape == (len(thresholds), len(sims))
    for t_i, t in enumerate(thresholds):
        for s_i, s in enumerate(sims):
            assert grid[t_i, s_i] == bool(meets(float(s), float(t))), (s, t)
    assert not meets(float("nan"), -math.inf) and not meets(-math.inf, -math.inf)
    assert meets(0.9, 0.9) and not meets(0.899, 0.9)


def test_exact_candidates_are_decided_at_similarity_one():
    sims = np.array([0.2, 0.2, np.nan])
    exact = np.array([True, False, True])
    assert hits(sims, 0.5, exact).tolist() == [True, False, True]
    assert hits(sims, 1.01, exact).tolist() == [False, False, False]  # a threshold above 1 refuses all
    assert exact_hit(StaticThreshold(EXACT_SIMILARITY)) and not exact_hit(StaticThreshold(1.01))


@pytest.mark.parametrize("policy", [StaticThreshold(0.8), PolicyThreshold(0.8),
                                    CalibratedThreshold(0.8, 0.05, 0.95, 0.01, 10, 5, 0)])
def test_every_policy_answers_with_the_rule(policy):
    for s in (0.79, 0.8, 0.95, float("nan")):
        assert policy.is_hit(s) == meets(s, 0.8)
    assert decide(policy, None) is None and decide(policy, float("-inf")) is None
    assert decide(policy, 0.85) is True and decide(policy, 0.5) is False
    assert not is_candidate(float("nan")) and is_candidate(-1.0)


def _stream(n=40, dim=8, seed=3):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(6, dim)).astype(np.float32)
    pick = rng.integers(0, 6, n)
    vecs = base[pick] + 0.05 * rng.normal(size=(n, dim)).astype(np.float32)
    prompts = [f"prompt {p} {'again' if i % 3 else ''}".strip() for i, p in enumerate(pick)]
    frame = pd.DataFrame({"prompt": prompts, "group": pick})
    return replay.ReplayStream.from_frame(frame, vecs)


@pytest.mark.parametrize("threshold", [0.7, 0.95, 1.0])
def test_vectorised_replay_and_engine_make_the_same_decisions(threshold):
    rs = _stream()
    fast, why = replay.replay_vectorized(rs, [threshold], exact_tier=True)[threshold]
    assert why is None
    slow, _ = replay.replay_engine(rs, CacheConfig(capacity=None), threshold)
    assert fast.hit.tolist() == slow.hit.tolist()
    assert fast.exact.tolist() == slow.exact.tolist()
    assert fast.matched_row.tolist() == slow.matched_row.tolist()


def test_a_threshold_refusing_exact_matches_is_handed_to_the_engine():
    rs = _stream()
    out = replay.replay_vectorized(rs, [0.7, 1.01], exact_tier=True)
    assert out[0.7][1] is None
    assert out[1.01][0] is None and "exact-tier" in out[1.01][1]
    decisions, used = replay.replay_sweep(rs, CacheConfig(capacity=None), [0.7, 1.01])
    assert used[0.7] == "vectorized" and used[1.01].startswith("engine")
    assert not decisions[1.01].hit.any()  # the engine: nothing ever meets a threshold above 1
    engine = SemanticCache(None, rs.dim, policy=StaticThreshold(1.01))
    engine.store(rs.prompts[0], "r", vector=rs.vectors[0])
    result = engine.check(rs.prompts[0], vector=rs.vectors[0])
    assert not result.hit and result.similarity == EXACT_SIMILARITY
