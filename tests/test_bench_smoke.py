"""Cheap checks of the benchmark code paths (bench/) and the encoder speed levers they measure.

Toy sizes, fake encoders where the model is not the point; structure and correctness only, never
speed.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bench import common, decision_quality, encode_throughput, lookup, service
from raycache.encoder import Encoder, EncoderError, length_batches


# ----------------------------------------------------------------------------- encoder levers
def test_length_batches_cover_every_item_once_and_bound_padding():
    rng = np.random.default_rng(0)
    counts = rng.integers(3, 64, size=300)
    batches = length_batches(counts, batch_size=32, max_pad_fraction=0.1, min_batch=8)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(300))
    for b in batches:
        assert 1 <= len(b) <= 32
        widest = counts[b].max()
        assert counts[b[0]] == widest  # longest first
        assert all(counts[i] >= 0.9 * widest for i in b[8:])  # past min_batch, padding <= 10%
    # cut by size only: full batches in descending length order
    by_size = length_batches(counts, batch_size=50)
    assert [len(b) for b in by_size] == [50] * 6
    assert np.all(np.diff(counts[np.concatenate(by_size)]) <= 0)


def test_encode_embeds_repeats_once_and_keeps_order(encoder, monkeypatch):
    texts = ["How tall is Mount Everest?", "hi", "How tall is Mount Everest?", "a longer prompt about tea"]
    seen: list[str] = []
    forward = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda batch: seen.extend(batch) or forward(batch))
    vecs = encoder.encode(texts, batch_size=2)
    assert sorted(seen) == sorted(set(texts))  # the repeat was embedded once
    np.testing.assert_array_equal(vecs[0], vecs[2])
    np.testing.assert_allclose(vecs[1], encoder.encode(["hi"])[0], atol=1e-5)
    assert encoder.encode([]).shape == (0, encoder.dim)
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["x"], batch_size=0)


def test_int8_encoder_is_close_opt_in_and_inference_only(encoder, tmp_path):
    quantized = Encoder.load(device="cpu", precision="int8")
    texts = ["What is the capital of France?", "Recipe for banana bread"]
    cos = np.sum(quantized.encode(texts) * encoder.encode(texts), axis=1)
    assert np.all(cos > 0.85) and quantized.precision == "int8" and encoder.precision == "fp32"
    with pytest.raises(EncoderError, match="inference-only"):
        quantized.save(tmp_path / "q")
    with pytest.raises(EncoderError, match="unknown precision"):
        Encoder.load(device="cpu", precision="fp8")


def test_encoder_precision_is_one_config_field_for_every_stage():
    from raycache.config import ConfigError, EncoderConfig, ServeConfig, TrainConfig, build_config
    from raycache.service.app import model_tag

    cfg = EncoderConfig(device="cpu", precision="int8")
    assert Encoder.from_config(cfg).precision == "int8"
    assert Encoder.from_config(cfg.model_copy(update={"precision": "fp32"})).precision == "fp32"
    # a served int8 cache keeps its own snapshots: fp32 vectors are not restored into it
    serve = build_config(ServeConfig, {"encoder": {"precision": "int8"}})
    assert model_tag(serve.encoder) == "default+int8" and model_tag(EncoderConfig()) == "default"
    with pytest.raises(ConfigError, match="inference-only"):
        build_config(TrainConfig, {"pairs": "p.jsonl", "out": "o", "encoder": {"precision": "int8"}})


# ----------------------------------------------------------------------------- shared helpers
def test_interleaved_alternates_order_and_tables_format():
    calls: list[str] = []
    seconds = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in seconds.items()} == {"a": 3, "b": 3}
    assert common.median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 1.0]) == 4.0
    table = common.markdown_table(["name", "value"], [["x", 1234.5], ["y", None]])
    assert table.splitlines() == ["| name | value |", "|---|---:|", "| x | 1,234 |", "| y | - |"]
    lat = common.latency_ms([0.001] * 99 + [0.1])
    assert lat["p50_ms"] == pytest.approx(1.0) and lat["n"] == 100


def test_write_results_adds_machine_facts(tmp_path):
    path = common.write_results("toy", {"value": np.float32(1.5)}, tmp_path)
    doc = json.loads(path.read_text())
    assert doc["value"] == 1.5 and doc["machine"]["nproc"] >= 1 and "date_utc" in doc["machine"]


# ----------------------------------------------------------------------------- benchmarks, toy size
def test_encode_throughput_rows_carry_speeds_and_ratios():
    fake = {"sentence-transformers": lambda texts, bs: np.ones((len(texts), 2), np.float32),
            "raycache": lambda texts, bs: np.ones((len(texts), 2), np.float32)}
    rows = encode_throughput.measure_throughput(fake, ["a", "b", "a"], [1, 2], repeats=2)
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert rows[0]["n_distinct"] == 2 and set(rows[0]["prompts_per_s"]) == set(fake)
    assert set(rows[0]["ratio_vs_sentence_transformers"]) == {"raycache"}


def test_lookup_case_exact_contenders_agree_and_hnsw_reports_recall():
    case = lookup.run_case(300, "clustered", n_queries=8, hnsw=True, engine=True, seed=1)
    recall = case["recall_at_1"]
    assert recall["numpy brute force"] == recall["faiss IndexFlatIP"] == 1.0
    assert recall["raycache FlatIndex"] == recall["raycache engine check (flat)"] == 1.0
    assert 0.0 <= recall["raycache HNSWIndex"] <= 1.0
    assert case["single"]["raycache FlatIndex"]["n"] == 8
    assert len(lookup.table_rows(case)) == 5


def test_question_split_keeps_components_whole():
    pairs = pd.DataFrame({"prompt_a": ["a", "b", "d", "f", "h", "j"],
                          "prompt_b": ["b", "c", "e", "g", "i", "k"],
                          "label": [1, 0, 1, 1, 0, 1]})
    part_of = decision_quality.split_questions(pairs, n_cal=2, n_test=2, seed=0)
    assert set(part_of) == set("abcdefghijk")
    for a, b in zip(pairs["prompt_a"], pairs["prompt_b"]):
        assert part_of[a] == part_of[b]
    assert part_of["a"] == part_of["c"]  # a-b-c is one component
    counts = pd.Series(part_of).value_counts()
    assert counts.get("test", 0) >= 2 and counts.get("calibration", 0) >= 2
    test = decision_quality.pairs_in(pairs, part_of, "test")
    assert all(part_of[q] == "test" for q in test["prompt_a"].tolist() + test["prompt_b"].tolist())


class _GroupEncoder:
    """Texts "g<k> ..." -> the unit vector of axis k: same group, same vector."""

    dim = 8

    def encode(self, texts, batch_size=64):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            out[i, int(t.split()[0][1:])] = 1.0
        return out


def test_service_engine_contender_counts_hits_and_false_hits():
    contender = service.EngineContender(_GroupEncoder(), batch=2)
    stream = [("g1 how tall", "answer of g1"), ("g2 what", "answer of g2"), ("g1 height of", "answer of g1"),
              ("g2 which", "answer of g3")]  # a hit whose stored response belongs to another group
    contender.replay(stream)
    summary = contender.tally.summary(contender.batch)
    assert summary["arrivals"] == 4 and summary["hit_rate"] == 0.5
    assert summary["false_hit_rate"] == 0.25 and summary["correct_hit_rate"] == 0.25
    assert summary["lookup"]["n"] == 2  # two batched lookup calls


def test_recipe_operating_points_choose_on_calibration_and_read_on_test():
    from bench import finetune_recipes
    from raycache.calibration import stream_counts
    from raycache.simulation import split_by_group
    from tests.test_simulation import clustered_stream

    stream, vecs = clustered_stream(1200, 60, 32, 1.2, seed=3)
    calib = split_by_group(stream, 0.5, seed=0)
    parts = [(stream[m].reset_index(drop=True), np.ascontiguousarray(vecs[m])) for m in (calib, ~calib)]
    ops = finetune_recipes.operating_points(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    assert set(ops) == {"0.01", "0.02", "0.05"}
    for delta, op in ops.items():
        # the empirical rule: the lowest grid threshold whose *calibration* false-hit rate is <= δ
        counts = stream_counts(*parts[0], [op["threshold"]], clusters="none") if op["threshold"] else None
        if counts is not None:
            assert counts.false_hits[0] / counts.arrivals <= float(delta) + 1e-12
        assert 0 <= op["correct_hit_rate"] and op["upper_bound_correct_hit_rate"] >= 0
        assert op["fixed_sequence"]["threshold"] is None or op["threshold"] is None or \
            op["fixed_sequence"]["threshold"] >= op["threshold"]  # the bound is the stricter rule
    assert ops["0.05"]["correct_hit_rate"] >= ops["0.01"]["correct_hit_rate"]  # more budget, more hits


# ----------------------------------------------------------------------------- bench.gptcache_http
class _KeyCache:
    """Async fake of an HTTP cache: a lookup hits the first response stored under the prompt's first
    word; every call yields to the event loop, and the most calls in flight at once is recorded."""

    def __init__(self):
        self.entries: dict[str, str] = {}
        self.in_flight = self.most_in_flight = 0

    async def _call(self):
        import asyncio

        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)
        self.in_flight -= 1

    async def lookup(self, prompt):
        await self._call()
        return self.entries.get(prompt.split()[0])

    async def store(self, prompt, response):
        await self._call()
        self.entries.setdefault(prompt.split()[0], response)


def _key_stream():
    # first word = what the fake matches on; "k1" is shared by groups a and b (b's arrivals hit a's)
    groups = ["a", "b", "a", "c", "b", "c", "c", "d", "a"] * 3
    return [(f"k{'1' if g in 'ab' else g} #{i}", f"answer of group {g}") for i, g in enumerate(groups)]


def test_gptcache_http_sequential_replay_counts_hits_false_hits_and_stores():
    import asyncio

    from bench import gptcache_http

    stream = _key_stream()
    caches = {"x": _KeyCache(), "y": _KeyCache()}
    runs = asyncio.run(gptcache_http.replay_level(caches, stream, concurrency=1, block=4))
    first: dict[str, str] = {}  # the sequential oracle of the fake
    hits = wrong = 0
    for prompt, response in stream:
        key = prompt.split()[0]
        if key in first:
            hits += 1
            wrong += first[key] != response
        first.setdefault(key, response)
    for name, run in runs.items():
        summary = run.summary()
        assert summary["arrivals"] == len(stream) and summary["lookup"]["n"] == summary["arrival"]["n"] == len(stream)
        assert summary["hit_rate"] == pytest.approx(hits / len(stream))
        assert summary["false_hit_rate"] == pytest.approx(wrong / len(stream)) and wrong > 0
        assert run.stores == len(stream) - hits and len(run.block_s) == -(-len(stream) // 4)
        assert caches[name].most_in_flight == 1


def test_gptcache_http_concurrent_replay_overlaps_and_accounts_every_arrival():
    import asyncio

    from bench import gptcache_http

    stream = _key_stream()
    cache = _KeyCache()
    run = asyncio.run(gptcache_http.replay_level({"x": cache}, stream, concurrency=4, block=8))["x"]
    summary = run.summary()
    assert cache.most_in_flight == 4  # the workers really overlap
    hits = round(summary["hit_rate"] * len(stream))
    assert summary["arrivals"] == len(stream) and run.stores == len(stream) - hits
    assert summary["http_requests_per_s"] > summary["requests_per_s"] > 0


def test_gptcache_http_arguments_config_and_server_start_failure(tmp_path):
    import argparse
    import sys

    from bench import gptcache_http

    assert gptcache_http.concurrency_levels("1, 8,32") == [1, 8, 32]
    for bad in ("0", "8,x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="not a positive integer"):
            gptcache_http.concurrency_levels(bad)
    cfg = gptcache_http.gptcache_config("/models/minilm", str(tmp_path / "d"), 0.8)
    assert cfg["embedding"] == "sbert" and cfg["embedding_config"] == {"model": "/models/minilm"}
    assert cfg["storage_config"]["manager"] == "sqlite,faiss"
    assert cfg["storage_config"]["eviction_params"]["max_size"] >= 100_000
    assert gptcache_http.cosine_of_similarity_threshold(0.8) == pytest.approx(0.6)
    assert gptcache_http.cosine_of_similarity_threshold(1.0) == pytest.approx(1.0)
    server = gptcache_http.Server("toy", [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"],
                                  "http://127.0.0.1:9", "/", tmp_path / "toy.log")
    with pytest.raises(RuntimeError, match=r"(?s)toy exited with code 3.*no model here"):
        server.wait_ready(timeout_s=60)
    server.stop()


def test_gptcache_http_raycache_alone_table_scales_against_the_first_level():
    import asyncio

    from bench import gptcache_http

    stream = _key_stream()
    levels = {}
    for c in (1, 4):
        runs = asyncio.run(gptcache_http.replay_level({gptcache_http.RAYCACHE: _KeyCache()}, stream, c, 8))
        levels[str(c)] = {"concurrency": c, "block": 8, "wall_s": 1.0, "load_avg_1m": [0.5, 0.6],
                          "raycache_vs_gptcache": None,
                          "contenders": {n: r.summary() for n, r in runs.items()}}
    scale = gptcache_http.scaling(levels)
    rates = {c: lv["contenders"][gptcache_http.RAYCACHE]["requests_per_s"] for c, lv in levels.items()}
    assert scale["1"] == 1.0 and scale["4"] == pytest.approx(rates["4"] / rates["1"])
    text = gptcache_http.table(levels)
    assert "GPTCache (gptcache_server)" not in text and f"{scale['4']:.2f}x" in text
    argv = gptcache_http.raycache_argv(8123, 0.93, shards=2)
    assert argv[-8:] == ["--host", "127.0.0.1", "--port", "8123", "--threshold", "0.93", "--shards", "2"]
    assert "--shards" not in gptcache_http.raycache_argv(8123, None)
