"""bench/engine_scale.py at toy size: the measurement runs and reports every column (speed is
never asserted here)."""

from bench import engine_scale


def test_engine_scale_measures_a_toy_cache():
    result = engine_scale.measure(entries=300, dim=16, index="flat", queries=20)
    assert result["entries"] == 300 and result["recall_at_1"] > 0.9
    for key in ("bytes_per_entry", "store_per_s", "snapshot_s", "save_s", "restore_s"):
        assert result[key] == result[key]  # a number, not NaN
    assert set(result["lookup"]) == set(result["store_at_capacity"]) == {"p50_ms", "p99_ms"}
    assert "| new |" in engine_scale.table([("new", result)])


def test_engine_scale_reports_index_recall_against_exact_search():
    result = engine_scale.measure(entries=300, dim=16, index="hnsw", queries=20, recall_queries=50)
    assert 0.5 < result["recall_at_1_vs_exact"] <= 1.0
    assert engine_scale.measure(entries=300, dim=16, index="flat", queries=20,
                                recall_queries=50)["recall_at_1_vs_exact"] == 1.0


def test_engine_scale_measures_the_per_history_overhead():
    result = engine_scale.measure_histories(conversations=50, turns=3, dim=16, index="flat", queries=30)
    assert result["entries"] == 150 and result["scopes"] == 1 + 50 * 2  # turn 0 shares the no-history scope
    assert result["hit_rate_own_scope"] > 0.9 and result["cross_scope_hits"] == 0
    assert set(result["lookup_own_scope"]) == set(result["lookup_other_scope"]) == {"p50_ms", "p99_ms"}
    assert "| new | 50 x 3 |" in engine_scale.history_table([("new", result)])
