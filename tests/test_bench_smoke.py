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
