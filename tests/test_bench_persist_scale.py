"""bench/persist_scale.py at toy size: every column is measured and the log restores the cache's
LRU order (speed is never asserted here)."""

from bench import persist_scale


def test_persist_scale_measures_a_toy_cache(tmp_path):
    result = persist_scale.measure(entries=400, dim=16, changed=0.05, segments=3, tmp_dir=str(tmp_path))
    assert result["entries"] == 400 and result["segments"] == 3
    for key in ("old_lock_s", "old_save_s", "old_restore_s", "base_s", "flush_s", "flush_lock_ms",
                "log_restore_s", "compact_s", "base_restore_s"):
        assert result[key] >= 0
    assert 0 < result["segment_mb"] < result["base_mb"] and "load average" in result["load_after"]
    assert "| 400 |" in persist_scale.table([result])
