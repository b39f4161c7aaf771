"""Simulation metrics, oracle, vectorized replay and sweep on streams whose answers are known.

The fake "encoder" here is a vector per group (one-hot, plus controlled noise or a planted near-miss),
so every hit, false hit and miss can be worked out by hand or by a naive reference replay.
"""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raycache.config import CacheConfig, ConfigError, SimulateConfig
from raycache.data import normalize_text
from raycache.simulation import metrics, offline


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered_stream(n: int, n_groups: int, dim: int, noise: float, seed: int,
                     namespaces: int = 1, phrasings: int = 3) -> tuple[pd.DataFrame, np.ndarray]:
    """Arrivals over groups (Zipf-ish); each group has `phrasings` prompts whose vectors are the
    group's one-hot direction plus Gaussian noise of expected norm `noise`."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_groups + 1)
    group = rng.choice(n_groups, size=n, p=weights / weights.sum())
    phrase = rng.integers(0, phrasings, size=n)
    base = np.eye(n_groups, dim, dtype=np.float32)
    table = _unit(base[:, None, :] + noise / np.sqrt(dim) * rng.normal(size=(n_groups, phrasings, dim)))
    stream = pd.DataFrame({
        "prompt": [f"question {g} phrased way {p}" for g, p in zip(group, phrase)],
        "group": [f"g{g}" for g in group],
        "response": [f"answer {g}" for g in group],
        "namespace": [f"tenant{i % namespaces}" for i in range(n)],
    })
    return stream, np.ascontiguousarray(table[group, phrase])


def reference_replay(stream: pd.DataFrame, vectors: np.ndarray, threshold: float,
                     exact_tier: bool) -> metrics.Decisions:
    """The semantics, written naively: one arrival at a time against everything stored so far."""
    dec = metrics.Decisions.empty(len(stream))
    stored: dict[str, list[int]] = {}
    for i, (prompt, space) in enumerate(zip(stream["prompt"], stream["namespace"])):
        rows = stored.setdefault(space, [])
        if exact_tier:
            same = [r for r in rows if normalize_text(stream["prompt"][r]) == normalize_text(prompt)]
            if same:
                dec.hit[i], dec.exact[i], dec.matched_row[i], dec.similarity[i] = True, True, same[0], 1.0
                continue
        if rows:
            sims = vectors[rows] @ vectors[i]
            j = int(np.argmax(sims))
            dec.similarity[i] = sims[j]
            if sims[j] >= threshold:
                dec.hit[i], dec.matched_row[i] = True, rows[j]
                continue
        rows.append(i)
    return dec


# ----------------------------------------------------------------------------- metrics


def test_oracle_by_group_respects_namespaces_and_unknown_rows():
    stream = pd.DataFrame({
        "prompt": list("abcdefg"),
        "group": ["a", "b", "a", "c", "b", "a", None],
        "namespace": ["x", "x", "x", "x", "x", "y", "x"],
    })
    assert metrics.correctness_mode(stream) == "group"
    # a repeats at 2; b at 4; the a at 5 is in another namespace; the last row has no group
    assert metrics.oracle_hits(stream).tolist() == [False, False, True, False, True, False, False]


def test_oracle_and_correctness_by_answers_when_no_groups():
    stream = pd.DataFrame({
        "prompt": ["p0", "p1", "p2", "p3", "p4"],
        "answers": [["Paris"], [" paris "], ["Rome"], ["Roma", "ROME"], []],
    })
    assert metrics.correctness_mode(stream) == "answers"
    assert metrics.oracle_hits(stream).tolist() == [False, True, False, True, False]
    dec = metrics.Decisions.empty(5)
    dec.hit[[1, 2, 3, 4]] = True
    dec.matched_row[[1, 2, 3, 4]] = [0, 0, 2, 0]  # correct, false, correct, unknown (no answers)
    assert metrics.hit_correctness(stream, dec).tolist() == [2, 1, 0, 1, -1]


def test_replay_metrics_counts_and_rates():
    stream = pd.DataFrame({"prompt": [f"p{i}" for i in range(8)],
                           "group": ["a", "a", "b", "a", "b", "c", "c", "b"]})
    dec = metrics.Decisions.empty(8)
    # hit -> origin row: 1->0 a=a, 3->0 a=a (exact), 4->2 b=b, 6->1 c!=a (false),
    # 7 -> an entry this replay did not store (unknown)
    hits = {1: 0, 3: 0, 4: 2, 6: 1, 7: -1}
    for row, origin in hits.items():
        dec.hit[row], dec.matched_row[row] = True, origin
    dec.exact[3] = True
    m = metrics.replay_metrics(stream, dec, threshold=0.8)
    assert (m["hits"], m["correct_hits"], m["false_hits"], m["unknown_hits"], m["exact_hits"]) == (5, 3, 1, 1, 1)
    assert m["hit_rate"] == pytest.approx(5 / 8)
    assert m["correct_hit_rate"] == pytest.approx(3 / 8)
    assert m["false_hit_rate"] == pytest.approx(1 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert (m["llm_calls"], m["llm_calls_saved"]) == (3, 5)


def test_unknown_correctness_gives_no_false_hit_rate_and_no_headline():
    stream = pd.DataFrame({"prompt": ["x", "y"]})
    dec = metrics.Decisions.empty(2)
    dec.hit[1], dec.matched_row[1] = True, 0
    m = metrics.replay_metrics(stream, dec, 0.9)
    assert m["correct_hits"] is None and m["false_hit_rate"] is None and m["unknown_hits"] == 1
    assert metrics.headline([m], 0.02) is None
    assert not metrics.oracle_hits(stream).any()


def test_headline_is_best_hit_rate_within_delta():
    sweep = [
        {"threshold": 0.7, "hit_rate": 0.80, "false_hit_rate": 0.10, "correct_hit_rate": 0.7, "precision": 0.875},
        {"threshold": 0.8, "hit_rate": 0.60, "false_hit_rate": 0.02, "correct_hit_rate": 0.58, "precision": 0.967},
        {"threshold": 0.85, "hit_rate": 0.60, "false_hit_rate": 0.01, "correct_hit_rate": 0.59, "precision": 0.983},
        {"threshold": 0.9, "hit_rate": 0.50, "false_hit_rate": 0.00, "correct_hit_rate": 0.5, "precision": 1.0},
    ]
    best = metrics.headline(sweep, 0.02)
    assert best["threshold"] == 0.85 and best["hit_rate"] == 0.60  # tie on hit rate: fewer false hits
    assert metrics.headline(sweep, 0.005)["threshold"] == 0.9
    assert metrics.headline(sweep[:1], 0.05) is None


def test_latency_summary_percentiles_in_ms():
    s = metrics.latency_summary([0.001 * i for i in range(1, 101)])
    assert s["count"] == 100 and s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)
    assert metrics.latency_summary([]) is None


# ----------------------------------------------------------------------------- replay


def planted_stream() -> tuple[pd.DataFrame, np.ndarray]:
    """Six arrivals with hand-computed outcomes.

    g1 and g2 are near-misses (cosine 0.9 between their vectors); g1's paraphrase has cosine 0.96
    to g1. Arrival order: g1, g1' (paraphrase), g2 (near miss), g1 (exact repeat), g3, g2.
    """
    e = np.eye(4, dtype=np.float32)
    g1 = e[0]
    g1p = _unit(0.96 * e[0] + np.sqrt(1 - 0.96 ** 2) * e[3])
    g2 = _unit(0.9 * e[0] + np.sqrt(1 - 0.81) * e[1])
    g3 = e[2]
    stream = pd.DataFrame({
        "prompt": ["capital of A?", "A's capital city?", "currency of A?", "Capital of  A?", "B?", "currency of A?"],
        "group": ["g1", "g1", "g2", "g1", "g3", "g2"],
    })
    return stream, np.stack([g1, g1p, g2, g1, g3, g2])


@pytest.mark.parametrize("threshold, hits, false_hits", [
    # 0.85: g1' hits g1; g2 falsely hits g1 (0.9); exact repeat hits; g3 misses; g2 falsely hits g1 again
    (0.85, [0, 1, 1, 1, 0, 1], 2),
    # 0.93: g1' hits; g2 misses and is stored; repeat hits; g3 misses; g2 hits its own entry (exact)
    (0.93, [0, 1, 0, 1, 0, 1], 0),
    # 0.99: the paraphrase misses too
    (0.99, [0, 0, 0, 1, 0, 1], 0),
])
def test_vectorized_replay_on_planted_stream(threshold, hits, false_hits):
    stream, vecs = planted_stream()
    rs = offline.ReplayStream.from_frame(stream, vecs)
    dec, _ = offline.replay_vectorized(rs, [threshold], exact_tier=True, chunk_size=16)[threshold]
    assert dec.hit.astype(int).tolist() == hits
    m = metrics.replay_metrics(stream, dec, threshold)
    assert m["false_hits"] == false_hits
    assert dec.exact[3] and dec.matched_row[3] == 0  # normalised exact repeat of arrival 0
    assert metrics.oracle_hits(stream).tolist() == [False, True, False, True, False, True]


def test_without_exact_tier_repeats_hit_by_similarity():
    stream, vecs = planted_stream()
    rs = offline.ReplayStream.from_frame(stream, vecs)
    dec, _ = offline.replay_vectorized(rs, [0.99], exact_tier=False)[0.99]
    assert dec.hit.astype(int).tolist() == [0, 0, 0, 1, 0, 1] and not dec.exact.any()
    assert dec.similarity[3] == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), chunk=st.integers(1, 70), noise=st.sampled_from([0.05, 0.3, 0.8]),
       exact_tier=st.booleans(), namespaces=st.integers(1, 3), jitter=st.sampled_from([0.0, 0.02]))
def test_vectorized_replay_equals_naive_replay(seed, chunk, noise, exact_tier, namespaces, jitter):
    """Chunk boundaries, namespaces, the exact tier, and (jitter) repeated prompts whose vectors
    differ from one arrival to the next, which the repeated-prompt memo must tell apart."""
    stream, vecs = clustered_stream(150, 12, 16, noise, seed, namespaces=namespaces)
    if jitter:
        vecs = _unit(vecs + jitter * np.random.default_rng(seed).normal(size=vecs.shape))
    thresholds = [0.5, 0.8, 0.95]
    rs = offline.ReplayStream.from_frame(stream, vecs)
    fast = offline.replay_vectorized(rs, thresholds, exact_tier=exact_tier, chunk_size=max(chunk, 1))
    for t in thresholds:
        ref = reference_replay(stream, vecs, t, exact_tier)
        decisions, handoff = fast[t]
        assert handoff is None
        np.testing.assert_array_equal(decisions.hit, ref.hit)
        np.testing.assert_array_equal(decisions.matched_row, ref.matched_row)
        np.testing.assert_array_equal(decisions.exact, ref.exact)


def test_capacity_overflow_hands_threshold_to_engine():
    stream, vecs = clustered_stream(300, 30, 32, 0.3, seed=3)
    rs = offline.ReplayStream.from_frame(stream, vecs)
    out = offline.replay_vectorized(rs, [0.3, 0.99], exact_tier=True, capacity=40)
    low, _ = out[0.3]
    assert int((~low.hit).sum()) <= 40
    assert out[0.99][0] is None and "capacity" in out[0.99][1]  # 0.99 stores every phrasing (70)


def test_replay_stream_validates_shape_and_fills_placeholder_responses():
    stream = pd.DataFrame({"prompt": ["a", "b"], "response": ["r", None]})
    rs = offline.ReplayStream.from_frame(stream, np.eye(2, dtype=np.float32))
    assert rs.responses[0] == "r" and rs.responses[1] == offline.placeholder_response(1)
    assert rs.namespaces.tolist() == ["default", "default"]
    with pytest.raises(Exception, match=r"expected \[2, dim\]"):
        offline.ReplayStream.from_frame(stream, np.eye(3, dtype=np.float32))


def test_load_embeddings_checks_rows_and_dtype(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "f64.npy", np.zeros((3, 4)))
    assert isinstance(offline.load_embeddings(str(tmp_path / "e.npy"), 3), np.memmap)
    with pytest.raises(Exception, match=r"expected \[5, dim\]"):
        offline.load_embeddings(str(tmp_path / "e.npy"), 5)
    with pytest.raises(Exception, match="float32"):
        offline.load_embeddings(str(tmp_path / "f64.npy"), 3)
    with pytest.raises(Exception, match="not found"):
        offline.load_embeddings(str(tmp_path / "nope.npy"), 3)


def test_chunked_replay_of_50k_memmapped_arrivals_stays_small(tmp_path):
    """50k arrivals x 384 dims (77 MB) replay from a memmap with a small, bounded working set."""
    n, dim, groups = 50_000, 384, 300
    rng = np.random.default_rng(7)
    weights = 1.0 / np.arange(1, groups + 1) ** 1.1
    group = rng.choice(groups, size=n, p=weights / weights.sum())
    phrase = rng.integers(0, 4, size=n)
    table = _unit(np.eye(groups, dim)[:, None, :] + 0.15 / np.sqrt(dim) * rng.normal(size=(groups, 4, dim)))
    path = tmp_path / "stream.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, 10_000):
        mm[s:s + 10_000] = table[group[s:s + 10_000], phrase[s:s + 10_000]]
    mm.flush()
    del mm, table
    stream = pd.DataFrame({"prompt": [f"q{g}-{p}" for g, p in zip(group, phrase)],
                           "group": [f"g{g}" for g in group]})
    vectors = offline.load_embeddings(str(path), n)
    rs = offline.ReplayStream.from_frame(stream, vectors)
    tracemalloc.start()
    decisions, _ = offline.replay_vectorized(rs, [0.6], exact_tier=False, chunk_size=1024)[0.6]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < n * dim * 4 / 4  # far below the 77 MB matrix: chunks, not the whole stream
    m = metrics.replay_metrics(stream, decisions, 0.6)
    oracle = metrics.oracle_hits(stream)
    # groups are orthogonal and paraphrases close: every repeat of a group hits, never falsely
    assert m["false_hits"] == 0
    assert m["hit_rate"] == pytest.approx(oracle.mean())


def test_offline_run_with_precomputed_embeddings_writes_report_and_plot(tmp_path):
    stream, vecs = clustered_stream(400, 20, 32, 0.6, seed=11)
    stream.to_json(tmp_path / "stream.jsonl", orient="records", lines=True)
    np.save(tmp_path / "emb.npy", vecs)
    from raycache import simulation

    cfg = SimulateConfig(stream=str(tmp_path / "stream.jsonl"), out=str(tmp_path / "out"),
                         embeddings=str(tmp_path / "emb.npy"), thresholds=[0.5, 0.7, 0.9, 0.97],
                         delta=0.02)
    report = simulation.run(cfg)
    saved = json.loads((tmp_path / "out" / "simulation.json").read_text())
    assert saved["arrivals"] == 400 and saved["correctness"] == "group"
    entry = saved["models"]["base"]
    assert [m["threshold"] for m in entry["sweep"]] == [0.5, 0.7, 0.9, 0.97]
    assert all(m["replay"] == "vectorized" for m in entry["sweep"])
    # the headline is the best hit rate among sweep points within δ, as computed by hand here
    within = [m for m in entry["sweep"] if m["false_hit_rate"] <= 0.02]
    assert entry["headline"]["hit_rate"] == max(m["hit_rate"] for m in within)
    assert saved["oracle_hit_rate"] == pytest.approx(metrics.oracle_hits(stream).mean())
    assert (tmp_path / "out" / "hit_vs_false_hit.png").stat().st_size > 1000
    assert report["models"]["base"]["headline"] == entry["headline"]


def test_single_threshold_writes_decisions_and_rejects_two_models_for_one_embedding(tmp_path):
    stream, vecs = planted_stream()
    stream.to_json(tmp_path / "s.jsonl", orient="records", lines=True)
    np.save(tmp_path / "e.npy", vecs)
    from raycache import simulation

    cfg = SimulateConfig(stream=str(tmp_path / "s.jsonl"), out=str(tmp_path / "o"),
                         embeddings=str(tmp_path / "e.npy"), threshold=0.93)
    report = simulation.run(cfg)
    decisions = pd.read_parquet(report["models"]["base"]["decisions"])
    assert decisions["hit"].astype(int).tolist() == [0, 1, 0, 1, 0, 1]
    assert report["models"]["base"]["headline"]["false_hit_rate"] == 0.0
    with pytest.raises(ConfigError, match="one model"):
        simulation.run(cfg.model_copy(update={"models": ["a", "b"]}))


def test_vectorized_replay_refuses_settings_it_cannot_reproduce():
    stream, vecs = planted_stream()
    rs = offline.ReplayStream.from_frame(stream, vecs)
    with pytest.raises(ConfigError, match="TTL"):
        offline.replay_sweep(rs, CacheConfig(ttl_s=10), [0.9], replay="vectorized")


# ----------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("exact_tier", [True, False])
def test_vectorized_replay_makes_the_engines_decisions(exact_tier):
    stream, vecs = clustered_stream(400, 25, 32, 0.6, seed=5, namespaces=2)
    rs = offline.ReplayStream.from_frame(stream, vecs)
    thresholds = [0.5, 0.75, 0.9]
    cache_cfg = CacheConfig(capacity=None, exact_tier=exact_tier)
    fast = offline.replay_vectorized(rs, thresholds, exact_tier=exact_tier, chunk_size=64)
    for t in thresholds:
        engine, stats = offline.replay_engine(rs, cache_cfg, t)
        decisions, handoff = fast[t]
        assert handoff is None
        np.testing.assert_array_equal(decisions.hit, engine.hit)
        np.testing.assert_array_equal(decisions.matched_row, engine.matched_row)
        np.testing.assert_array_equal(decisions.exact, engine.exact)
        np.testing.assert_allclose(decisions.similarity, engine.similarity, atol=1e-5)
        assert stats["hits"] == int(engine.hit.sum()) and stats["entries"] == int((~engine.hit).sum())
    assert 0 < fast[0.75][0].hit.mean() < 1


def test_sweep_hands_thresholds_past_capacity_to_the_engine():
    stream, vecs = clustered_stream(300, 30, 32, 0.3, seed=3)
    rs = offline.ReplayStream.from_frame(stream, vecs)
    bounded = CacheConfig(capacity=40)
    decisions, used = offline.replay_sweep(rs, bounded, [0.3, 0.99])
    assert used[0.3] == "vectorized" and used[0.99].startswith("engine (the cache outgrew")
    engine, stats = offline.replay_engine(rs, bounded, 0.99)
    assert stats["evictions"] > 0 and stats["entries"] == 40
    np.testing.assert_array_equal(decisions[0.99].hit, engine.hit)
    unbounded, _ = offline.replay_vectorized(rs, [0.99])[0.99]
    assert (unbounded.hit & ~engine.hit).any()  # evicted entries turn some hits into misses


def test_ttl_expires_in_simulated_time():
    stream = pd.DataFrame({"prompt": ["What is A?", "what is a?", "What is A?", "What is A?"],
                           "group": ["a"] * 4, "timestamp": [0.0, 5.0, 20.0, 25.0]})
    vecs = np.tile(np.eye(1, 8, dtype=np.float32), (4, 1))
    rs = offline.ReplayStream.from_frame(stream, vecs)
    cfg = CacheConfig(ttl_s=10.0, capacity=None)
    decisions, used = offline.replay_sweep(rs, cfg, [0.9], times=offline.arrival_times(stream))
    assert used[0.9] == "engine (TTL expiry)"
    # stored at 0, hit at 5, expired by 20 (stored again), hit at 25
    assert decisions[0.9].hit.tolist() == [False, True, False, True]
    assert decisions[0.9].matched_row.tolist() == [-1, 0, -1, 2]
    np.testing.assert_array_equal(offline.arrival_times(stream.drop(columns="timestamp"), rate=4.0),
                                  [0.0, 0.25, 0.5, 0.75])
    with pytest.raises(Exception, match="non-decreasing"):
        offline.arrival_times(stream.assign(timestamp=[3.0, 1.0, 2.0, 4.0]))


def test_report_json_is_strict(tmp_path):
    from raycache.simulation import write_json_atomic

    write_json_atomic({"bound": float("inf"), "sims": [np.float32(0.5), float("nan")]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"bound": None, "sims": [0.5, None]}


def test_calibrated_policy_replay_equals_static_replay_at_its_threshold(tmp_path, monkeypatch):
    """With cache.policy=calibrated the engine also replays under the policy fitted on labelled
    pairs; its decisions are those of a static replay at the fitted threshold."""
    stream, vecs = clustered_stream(300, 20, 32, 0.6, seed=9)
    vector_of = dict(zip(stream["prompt"], vecs))

    class LookupEncoder:  # the model "embeds" a prompt as its planted vector
        dim = 32

        def encode(self, texts, batch_size=64, progress=False):
            return np.stack([vector_of[t] for t in texts])

    monkeypatch.setattr("raycache.encoder.Encoder.load", lambda *a, **k: LookupEncoder())
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(stream), 400), rng.integers(0, len(stream), 400)
    pairs = pd.DataFrame({"prompt_a": stream["prompt"][a].to_numpy(), "prompt_b": stream["prompt"][b].to_numpy(),
                          "label": (stream["group"][a].to_numpy() == stream["group"][b].to_numpy()).astype(float)})
    pairs.to_json(tmp_path / "pairs.jsonl", orient="records", lines=True)
    cfg = SimulateConfig(stream="unused", out=str(tmp_path), thresholds=[0.5, 0.9],
                         cache=CacheConfig(capacity=None, policy="calibrated", target_false_hit=0.1,
                                           calibration_pairs=str(tmp_path / "pairs.jsonl")))
    entry = offline.simulate_model(stream, vecs, cfg, "group")
    calibrated = entry["calibrated"]
    assert calibrated["policy"]["policy"] == "calibrated" and calibrated["policy"]["qualified"]
    t = calibrated["threshold"]
    static, _ = offline.replay_vectorized(offline.ReplayStream.from_frame(stream, vecs), [t])[t]
    assert calibrated["hits"] == int(static.hit.sum())
    assert calibrated["false_hits"] == metrics.replay_metrics(stream, static, t)["false_hits"]
