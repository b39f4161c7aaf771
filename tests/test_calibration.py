"""Per-request calibration: fixed-sequence selection, its coverage on streams with a known false-hit
curve, policy files (model identity), the calibrate/simulate commands, and the operating point."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import beta

from raycache import calibration as cal
from raycache.cache import SemanticCache
from raycache.cache.engine import policy_from_config
from raycache.cli import run_job
from raycache.config import CacheConfig, ConfigError, SimulateConfig
from raycache.data import DataError
from raycache.simulation import metrics, offline, operating_point, split_by_group
from tests.test_simulation import clustered_stream

DELTA = 0.02
GRID = cal.calibration_thresholds()


# ----------------------------------------------------------------------------- synthetic streams
def known_stream(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each arrival's best cached match has similarity s ~ U(0, 1) and is wrong with probability
    1 − s. The per-arrival false-hit rate at threshold t is then P(s ≥ t, wrong) = (1 − t)² / 2."""
    sims = rng.uniform(0, 1, n)
    return sims, rng.uniform(0, 1, n) < 1 - sims


def true_rate(t: float) -> float:
    return (1 - t) ** 2 / 2


T_STAR = 1 - math.sqrt(2 * DELTA)  # lowest threshold meeting δ: 0.8


def test_fixed_sequence_stops_at_the_first_failure_and_uses_clopper_pearson():
    ts = [0.99, 0.95, 0.9, 0.85, 0.8]
    counts = cal.ThresholdCounts(np.array(ts), 1000, hits=np.array([10, 20, 40, 100, 200]),
                                 exact_hits=np.zeros(5, int), correct_hits=np.array([10, 19, 35, 100, 199]),
                                 false_hits=np.array([0, 1, 5, 0, 1]), unknown_hits=np.zeros(5, int))
    sel = cal.fixed_sequence(counts, delta=0.008, confidence=0.95)
    # 0/1000 and 1/1000 pass, 5/1000 fails: stop there although 0.85 and 0.8 would pass on their own
    np.testing.assert_allclose(sel.ucb[:3], beta.ppf(0.95, np.array([0, 1, 5]) + 1, 1000 - np.array([0, 1, 5])))
    assert sel.threshold == 0.95 and sel.tested == 3 and np.isnan(sel.ucb[3:]).all()
    assert cal.empirical_rule(counts, delta=0.008).threshold == 0.8  # the plain rule ignores order
    assert cal.fixed_sequence(counts, delta=1e-5).threshold is None
    # among hits: trials are the hits; the start skips thresholds too small to ever pass
    among = cal.fixed_sequence(counts, delta=0.05, bound="among_hits")
    assert cal.min_trials_to_pass(0.05, 0.95) == 59
    assert np.isnan(among.ucb[:3]).all() and among.threshold == 0.8


def test_per_request_policy_meets_delta_in_95_percent_of_200_runs():
    """Coverage: the fixed-sequence policy's true (and realised) per-request false-hit rate is ≤ δ in
    ≥ 95% of 200 seeded calibrations; the plain empirical rule is not."""
    true_fs, realised_fs, true_emp, chosen = [], [], [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        counts = cal.counts_from_outcomes(*known_stream(2000, rng), GRID)
        t = cal.fixed_sequence(counts, DELTA).threshold
        assert t is not None
        chosen.append(t)
        true_fs.append(true_rate(t) <= DELTA)
        test_sims, test_wrong = known_stream(20_000, rng)  # a fresh stream served by the policy
        realised_fs.append(np.mean((test_sims >= t) & test_wrong) <= DELTA)
        true_emp.append(true_rate(cal.empirical_rule(counts, DELTA).threshold) <= DELTA)
    assert np.mean(true_fs) >= 0.95 and np.mean(realised_fs) >= 0.95
    assert np.mean(true_emp) < 0.8  # the plain rule overshoots δ often: the test can tell them apart
    assert T_STAR < np.median(chosen) < T_STAR + 0.06  # and the bound is not absurdly conservative


def test_horizon_bound_covers_the_realised_rate_of_a_short_window():
    """With ``horizon`` = M, the realised false-hit rate over the next M requests is ≤ δ in ≥ 95% of
    200 runs, where the traffic-rate bound alone overshoots δ on such windows far more often; the
    price is a higher threshold, and it tends to the traffic bound as M grows."""
    horizon = 2000
    realised_pop, realised_hor, t_pop, t_hor = [], [], [], []
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        counts = cal.counts_from_outcomes(*known_stream(4000, rng), GRID)
        a = cal.fixed_sequence(counts, DELTA).threshold
        b = cal.fixed_sequence(counts, DELTA, horizon=horizon).threshold
        sims, wrong = known_stream(horizon, rng)  # the next M requests
        realised_pop.append(np.mean((sims >= a) & wrong) <= DELTA)
        realised_hor.append(np.mean((sims >= b) & wrong) <= DELTA)
        t_pop.append(a)
        t_hor.append(b)
    assert np.mean(realised_hor) >= 0.95
    assert np.mean(realised_pop) < np.mean(realised_hor) - 0.05
    assert all(h >= p for h, p in zip(t_hor, t_pop))
    counts = cal.counts_from_outcomes(*known_stream(4000, np.random.default_rng(0)), GRID)
    long = cal.fixed_sequence(counts, DELTA, horizon=10**9)
    assert abs(long.threshold - cal.fixed_sequence(counts, DELTA).threshold) <= 0.011
    with pytest.raises(ConfigError, match="horizon"):
        cal.fixed_sequence(counts, DELTA, bound="among_hits", horizon=100)
    assert cal.fit_policy(counts, DELTA, horizon=horizon).horizon == horizon


def test_counts_from_the_replay_are_the_simulators_metrics():
    stream, vecs = clustered_stream(500, 30, 32, 1.5, seed=4, namespaces=2)
    counts = cal.stream_counts(stream, vecs, [0.5, 0.7, 0.9])
    assert counts.thresholds.tolist() == [0.9, 0.7, 0.5]
    rs = offline.ReplayStream.from_frame(stream, vecs)
    for i, t in enumerate(counts.thresholds):
        engine, _ = offline.replay_engine(rs, CacheConfig(capacity=None), float(t))
        m = metrics.replay_metrics(stream, engine, float(t))
        assert (counts.hits[i], counts.false_hits[i], counts.correct_hits[i], counts.exact_hits[i]) == (
            m["hits"], m["false_hits"], m["correct_hits"], m["exact_hits"])
    assert counts.false_hits[-1] > counts.false_hits[0]  # noise 0.9: low thresholds hit falsely
    with pytest.raises(DataError, match="labelled stream"):
        cal.stream_counts(stream.drop(columns="group"), vecs, [0.5])


def test_design_effect_is_one_for_independent_arrivals_and_the_cluster_size_for_shared_fates():
    rng = np.random.default_rng(7)
    n, size = 20_000, 8
    clusters = np.repeat(np.arange(n // size), size)
    independent = rng.uniform(size=n) < 0.05
    shared = np.repeat(rng.uniform(size=n // size) < 0.05, size)  # a cluster's arrivals fail together
    d = cal.design_effect(np.stack([independent, shared]), clusters)
    assert d[0] == pytest.approx(1.0, abs=0.15)
    assert d[1] == pytest.approx(size, rel=0.1)
    assert cal.design_effect(np.zeros((1, 10), bool), np.arange(10))[0] == 1.0  # no failures: no inflation


def test_confusion_clusters_join_the_groups_a_false_hit_links():
    groups = np.array([0, 0, 1, 1, 2, 3])
    class D:  # the one field failure_clusters reads
        matched_row = np.array([-1, 0, -1, 0, -1, 4])
    verdict = np.array([2, 1, 2, 0, 2, 0])  # arrival 3 (group 1) got group 0's answer; 5 got 2's
    ids = cal.failure_clusters(groups, D, verdict, "confusion")
    assert ids[0] == ids[1] == ids[2] == ids[3] and ids[4] == ids[5] and ids[0] != ids[4]
    assert cal.failure_clusters(groups, D, verdict, "group").tolist() == groups.tolist()
    assert cal.failure_clusters(groups, D, verdict, "none") is None
    with pytest.raises(ConfigError, match="clusters"):
        cal.failure_clusters(groups, D, verdict, "arrivals")


def test_correlated_false_hits_widen_the_bound_and_raise_the_threshold():
    stream, vecs = clustered_stream(1500, 60, 32, 1.2, seed=5)
    grid = [round(0.5 + 0.02 * i, 2) for i in range(25)]
    plain = cal.stream_counts(stream, vecs, grid, clusters="none")
    robust = cal.stream_counts(stream, vecs, grid, clusters="confusion")
    assert plain.design_effect is None and (robust.design_effect >= 1).all()
    assert (robust.false_hits == plain.false_hits).all()  # same replay, only the bound changes
    hi = robust.false_hits > 0
    assert robust.design_effect[hi].max() > 1.2  # groups confused with each other fail together
    delta = float(np.median(plain.false_hits[hi] / plain.arrivals))
    a, b = cal.fixed_sequence(plain, delta), cal.fixed_sequence(robust, delta)
    assert b.ucb[b.tested - 1] >= a.ucb[b.tested - 1]
    assert (b.threshold or 2.0) >= (a.threshold or 2.0)
    policy = cal.fit_policy(robust, delta)
    assert all(row["design_effect"] >= 1 and isinstance(row["trials"], int) for row in policy.tested)


# ----------------------------------------------------------------------------- files and commands
@pytest.fixture()
def fake_model(tmp_path):
    """A model folder that is never loaded (the runs use precomputed embeddings): its files alone
    give it an identity."""
    folder = tmp_path / "model"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 32}')
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (folder / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(3 << 20))
    return folder


def test_model_fingerprint_follows_the_files_not_the_path(fake_model, tmp_path):
    import shutil

    first = cal.model_fingerprint(str(fake_model))
    copy = shutil.copytree(fake_model, tmp_path / "copy")
    assert cal.model_fingerprint(str(copy)) == first
    (copy / "similarity_head.json").write_text('{"scale": 0.1, "bias": 7.0}')  # a fine-tune
    assert cal.model_fingerprint(str(copy)) != first
    assert cal.model_identity(None)["path"] == "default"
    assert cal.model_fingerprint("default") == cal.model_fingerprint(None) != first


def _write_stream(tmp_path, name, seed, n=600):
    stream, vecs = clustered_stream(n, 40, 32, 1.5, seed=seed)
    stream = stream.drop(columns=["namespace"])
    stream.to_json(tmp_path / f"{name}.jsonl", orient="records", lines=True)
    np.save(tmp_path / f"{name}.npy", vecs)
    return tmp_path / f"{name}.jsonl", tmp_path / f"{name}.npy"


def test_calibrate_writes_a_policy_that_simulate_and_the_engine_load(tmp_path, fake_model, capsys):
    stream, emb = _write_stream(tmp_path, "calib", seed=1)
    policy_path = tmp_path / "policy.json"
    assert run_job("calibrate", ["--stream", str(stream), "--model", str(fake_model),
                                 "--embeddings", str(emb), "--target-false-hit", "0.05",
                                 "--out", str(policy_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    policy = json.loads(policy_path.read_text())
    for key in ("threshold", "delta", "confidence", "bound", "ucb", "n_arrivals", "n_false_hits",
                "model", "created", "tested"):
        assert key in policy
    assert policy["bound"] == "per_request" and policy["delta"] == 0.05 and policy["n_arrivals"] == 600
    assert policy["model"] == cal.model_identity(str(fake_model)) and summary["qualified"]
    assert policy["ucb"] <= 0.05 and policy["tested"][0]["threshold"] == max(GRID)
    assert [t["threshold"] for t in policy["tested"]] == sorted(
        [t["threshold"] for t in policy["tested"]], reverse=True)
    assert policy["tested"][-1]["ucb"] > 0.05 or policy["tested"][-1]["threshold"] == min(GRID)
    assert summary["at_threshold"]["false_hits"] == policy["n_false_hits"]
    # by default the bound covers the realised rate of a window as long as the calibration stream;
    # --horizon none bounds the long-run rate only (looser: never a higher threshold)
    assert policy["horizon"] == 600
    long_run = tmp_path / "policy_long_run.json"
    assert run_job("calibrate", ["--stream", str(stream), "--model", str(fake_model),
                                 "--embeddings", str(emb), "--target-false-hit", "0.05",
                                 "--horizon", "none", "--out", str(long_run)]) == 0
    capsys.readouterr()
    loose = json.loads(long_run.read_text())
    assert loose["horizon"] is None and loose["threshold"] <= policy["threshold"]
    assert cal.resolve_horizon(0, "among_hits", 600) is None and cal.resolve_horizon(50, "per_request", 600) == 50

    # simulate --policy replays with the file's threshold (nothing refitted) and reports the result
    test_stream, test_emb = _write_stream(tmp_path, "test", seed=2)
    out = tmp_path / "sim"
    assert run_job("simulate", ["--stream", str(test_stream), "--embeddings", str(test_emb),
                                "--model", str(fake_model), "--policy", str(policy_path),
                                "--out", str(out), "--thresholds", "0.9"]) == 0
    (entry,) = json.loads((out / "simulation.json").read_text())["models"].values()
    assert entry["policy"]["threshold"] == policy["threshold"] and entry["policy"]["bound"] == "per_request"
    assert entry["policy"]["policy"]["policy"] == "file"
    assert entry["policy"]["realised_rate"] == entry["policy"]["false_hit_rate"]
    assert [d["delta"] for d in entry["operating_point"]["deltas"]] == [0.01, 0.02, 0.05]
    capsys.readouterr()

    # another model: refused, with a message naming both
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert run_job("simulate", ["--stream", str(test_stream), "--embeddings", str(test_emb),
                                "--model", str(other), "--policy", str(policy_path),
                                "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "calibrated for model" in err and "Recalibrate" in err

    # the engine (and so the service) takes the threshold from the file
    class Enc:
        dim, source = 32, str(fake_model)

    decision = policy_from_config(CacheConfig(policy_file=str(policy_path)), Enc())
    assert decision.threshold == policy["threshold"] and decision.describe()["bound"] == "per_request"
    cache = SemanticCache.from_config(CacheConfig(policy_file=str(policy_path)), encoder=Enc())
    assert cache.stats()["policy"]["ucb"] == policy["ucb"]
    Enc.source = str(other)
    with pytest.raises(ConfigError, match="calibrated for model"):
        policy_from_config(CacheConfig(policy_file=str(policy_path)), Enc())


def test_policy_file_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        cal.PolicyFile.read(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"threshold": 0.9}')
    with pytest.raises(ConfigError, match="not a raycache policy file"):
        cal.PolicyFile.read(tmp_path / "bad.json")
    counts = cal.counts_from_outcomes(*known_stream(300, np.random.default_rng(0)), GRID)
    never = cal.fit_policy(counts, delta=0.001)  # 300 arrivals cannot show 0.1%
    assert not never.qualified and never.ucb is None
    never.write(tmp_path / "never.json")
    loaded = cal.PolicyFile.read(tmp_path / "never.json").decision_policy()
    assert not loaded.is_hit(1.0) and loaded.describe()["threshold"] is None


def test_among_hits_bound_is_named_and_stricter():
    counts = cal.counts_from_outcomes(*known_stream(5000, np.random.default_rng(3)), GRID)
    per_request = cal.fit_policy(counts, 0.05, bound="per_request")
    among = cal.fit_policy(counts, 0.05, bound="among_hits")
    assert per_request.bound == "per_request" and among.bound == "among_hits"
    assert among.threshold > per_request.threshold
    with pytest.raises(ConfigError, match="bound must be"):
        cal.fixed_sequence(counts, 0.05, bound="per_hit")


# ----------------------------------------------------------------------------- operating point
def test_split_by_group_keeps_groups_whole():
    stream, _ = clustered_stream(800, 60, 32, 0.5, seed=0)
    mask = split_by_group(stream, 0.5, seed=1)
    assert 0.3 < mask.mean() < 0.7
    assert not set(stream["group"][mask]) & set(stream["group"][~mask])
    np.testing.assert_array_equal(mask, split_by_group(stream, 0.5, seed=1))


def test_operating_point_on_disjoint_streams():
    stream, vecs = clustered_stream(1600, 80, 32, 1.5, seed=6)
    mask = split_by_group(stream, 0.5, seed=0)
    calib, test = stream[mask].reset_index(drop=True), stream[~mask].reset_index(drop=True)
    result = operating_point(calib, test, "toy", calib_vectors=vecs[mask], test_vectors=vecs[~mask],
                             deltas=(0.01, 0.05))
    assert [d["delta"] for d in result["deltas"]] == [0.01, 0.05]
    assert result["test"]["arrivals"] == (~mask).sum()
    for d in result["deltas"]:
        best, fs, emp = d["best_on_test"], d["fixed_sequence"], d["empirical"]
        assert best["upper_bound"] and best["false_hit_rate"] <= d["delta"]
        assert fs["correct_hit_rate"] <= best["correct_hit_rate"] + 1e-12
        assert emp["threshold"] is None or fs["threshold"] is None or emp["threshold"] <= fs["threshold"]
        for row in (fs, emp, best):
            assert row["hit_rate"] == pytest.approx(row["exact_hit_rate"] + row["semantic_hit_rate"])
            assert row["correct_hit_rate"] + row["false_hit_rate"] == pytest.approx(row["hit_rate"])
        assert fs["calibration_ucb"] is None or fs["calibration_ucb"] <= d["delta"]
    # the same as one call on the whole stream split internally
    from raycache.simulation import operating_point_split

    assert operating_point_split(stream, vecs, "toy", deltas=(0.01, 0.05))["deltas"] == result["deltas"]
    # calibrate's default rule: the realised rate over as many requests as the calibration stream
    windowed = operating_point(calib, test, "toy", calib_vectors=vecs[mask], test_vectors=vecs[~mask],
                               deltas=(0.01, 0.05), horizon="calibration")
    assert windowed["horizon"] == mask.sum()
    for loose, strict in zip(result["deltas"], windowed["deltas"]):
        t_loose, t_strict = loose["fixed_sequence"]["threshold"], strict["fixed_sequence"]["threshold"]
        assert t_strict is None or (t_loose is not None and t_strict >= t_loose)
    with pytest.raises(DataError, match="share"):
        operating_point(stream, stream, calib_vectors=vecs, test_vectors=vecs)


def test_simulate_reports_the_operating_point(tmp_path):
    stream_path, emb = _write_stream(tmp_path, "s", seed=5, n=800)
    from raycache import simulation

    report = simulation.run(SimulateConfig(stream=str(stream_path), out=str(tmp_path / "o"),
                                           embeddings=str(emb), thresholds=[0.8, 0.9]))
    op = report["models"]["base"]["operating_point"]
    assert op["split"]["by"] == "group" and len(op["deltas"]) == 3
    assert op["calibration"]["arrivals"] + op["test"]["arrivals"] == 800
