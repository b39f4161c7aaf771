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
