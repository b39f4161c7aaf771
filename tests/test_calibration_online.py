"""The online policy: its stratified bound, threshold moves, and the replayed online simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta

from raycache.cache.online_policy import OnlinePolicy, OnlineSettings
from raycache.simulation.online import simulate_online
from tests.test_simulation import clustered_stream


def test_bound_is_the_stratified_clopper_pearson_formula():
    policy = OnlinePolicy(0.9, OnlineSettings(verify_near=1.0, verify_far=1.0, explore=0.0,
                                              check_every=10 ** 9), seed=0)
    for i in range(100):  # 100 requests: 40 hits at 0.92 (all verified, 4 wrong), 60 without candidate
        rid, d = policy.decide("a", 0.92 if i < 40 else None)
        if d.verify:
            policy.record("a", rid, wrong=i < 4)
    b = policy.bound("a")
    assert b["verified_in_window"] == 40 and b["estimate"] == pytest.approx(4 / 100)
    assert b["ucb"] == pytest.approx(0.4 * beta.ppf(0.95, 5, 36))
    assert policy.bound("a", threshold=0.95)["ucb"] == 0.0  # nothing at or above 0.95
    assert policy.stats()["namespaces"]["a"]["wrong"] == 4 and "b" not in policy.stats()["namespaces"]


def test_threshold_rises_on_wrong_hits_and_comes_down_on_good_shadow_evidence():
    settings = OnlineSettings(delta=0.02, verify_near=1.0, verify_far=1.0, explore=1.0,
                              min_verified=20, check_every=10, floor=0.8)
    up = OnlinePolicy(0.85, settings, seed=1)
    rng = np.random.default_rng(0)
    for _ in range(2000):  # similarities 0.85-0.9 are wrong half the time, above 0.9 always right
        s = float(rng.uniform(0.84, 0.95)) if rng.uniform() < 0.3 else None
        rid, d = up.decide("ns", s)
        if d.verify:
            up.record("ns", rid, wrong=s < 0.9 and rng.uniform() < 0.5)
    # true per-request rate: 0.3 · (0.9 − t) / 0.11 · 0.5, i.e. ≤ 2% from t ≈ 0.885 on
    assert 0.88 <= up.threshold("ns") <= 0.92 and up.threshold("other") == 0.85  # per namespace
    assert up.changes("ns")[0]["from"] == 0.85 and up.changes("ns")[0]["ucb_before"] > 0.02

    down = OnlinePolicy(0.95, settings, seed=2)
    for _ in range(3000):  # every candidate is right: shadow verifications let it come down
        s = float(rng.uniform(0.9, 1.0)) if rng.uniform() < 0.2 else None
        rid, d = down.decide("ns", s)
        if d.verify:
            down.record("ns", rid, wrong=False)
    assert down.threshold("ns") < 0.95 and down.threshold("ns") >= 0.8
    assert down.changes("ns")[-1]["to"] < down.changes("ns")[-1]["from"]  # (early, thin evidence may raise it first)


def test_online_simulation_from_a_too_low_threshold_falls_under_delta_cheaply():
    stream, vecs = clustered_stream(3000, 60, 32, 1.5, seed=3)
    stream = stream.drop(columns="namespace")
    settings = OnlineSettings(delta=0.02, window=3000)
    # at 0.35 a static cache answers 27% of requests wrongly; the calibrated region is about 0.55
    result = simulate_online(stream, vecs, 0.35, settings, seed=0, trace_every=100, rolling=500)
    assert result["final_thresholds"]["default"] > 0.5 and result["changes"]
    assert result["second_half_false_hit_rate"] <= 0.02
    assert result["extra_upstream_calls_per_request"] <= 0.10
    assert result["verifications_until_under_delta"] is None or result["verifications_until_under_delta"] < 300
    static = simulate_online(stream, vecs, 0.35, OnlineSettings(verify_near=0, verify_far=0, explore=0))
    assert static["false_hit_rate"] > 0.2 > 0.05 > result["false_hit_rate"]  # without verification it stays high
    assert [p["arrival"] for p in result["trace"]][:2] == [100, 200]


def test_simulate_reports_the_online_replay(tmp_path):
    from raycache import simulation
    from raycache.config import SimulateConfig

    stream, vecs = clustered_stream(600, 40, 32, 1.5, seed=2)
    stream.drop(columns="namespace").to_json(tmp_path / "s.jsonl", orient="records", lines=True)
    np.save(tmp_path / "e.npy", vecs)
    report = simulation.run(SimulateConfig(stream=str(tmp_path / "s.jsonl"), out=str(tmp_path / "o"),
                                           embeddings=str(tmp_path / "e.npy"), thresholds=[0.9],
                                           operating_point=False, online_start=0.4))
    online = report["models"]["base"]["online"]
    assert online["start_threshold"] == 0.4 and "trace" not in online  # the summary leaves it out
    assert 0 <= online["extra_upstream_calls_per_request"] <= 0.1
