"""Incremental persistence (raycache.cache.segments): crash/restart from the segment log, compaction,
removals / evictions / clears / TTL across restores, leftover cleanup, corrupt segments, the legacy
snapshot upgrade, failed writes, a non-local filesystem, and no full copy under the lock per flush."""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from raycache.cache import LRUEviction, PeriodicFlush, SemanticCache, SnapshotError, StaticThreshold, quarantine
from tests.test_cache import DIM, FakeClock

rng = np.random.default_rng(7)


def vectors(n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def new_cache(clock: FakeClock, capacity=None, ttl_s=None, model_tag="m") -> SemanticCache:
    return SemanticCache(None, DIM, eviction=LRUEviction(capacity, ttl_s), policy=StaticThreshold(0.95),
                         clock=clock, model_tag=model_tag)


def store(cache: SemanticCache, names, namespace="default", history=None, ttl_s=None) -> list[int]:
    names = list(names)
    return cache.store_batch([f"prompt {n}" for n in names], [f"response {n}" for n in names], namespace,
                             None if history is None else [history] * len(names), ttl_s,
                             vectors=vectors(len(names)))


def assert_same(a: SemanticCache, b: SemanticCache) -> None:
    """Same entries, ids, vectors, times, texts, scopes and LRU order; same next id."""
    sa, sb = a.snapshot(), b.snapshot()
    assert sa.ids.tolist() == sb.ids.tolist()
    np.testing.assert_allclose(sa.vectors, sb.vectors, atol=1e-6)
    for name in ("created_at", "last_access", "expires_at"):
        np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name))
    for name in ("prompts", "responses", "namespaces", "history_hashes"):
        assert getattr(sa, name) == getattr(sb, name)
    assert sa.meta["next_id"] == sb.meta["next_id"] and sb.meta["model"] == sa.meta["model"]


def logged(tmp_path, *batches, **kwargs) -> tuple[FakeClock, object, SemanticCache, PeriodicFlush]:
    """A cache with a PeriodicFlush at ``tmp_path/log``: each batch of names stored, then flushed."""
    clock, path = FakeClock(), tmp_path / "log"
    cache = new_cache(clock, **kwargs)
    flush = PeriodicFlush(path, cache, interval_s=3600)
    for names in batches:
        store(cache, names)
        assert flush.save()
    return clock, path, cache, flush


def use_oldest(cache: SemanticCache) -> None:
    """A semantic hit on the least recently used entry of the default scope (it becomes the most
    recent)."""
    snap = cache.snapshot()
    i = next(i for i, (ns, h) in enumerate(zip(snap.namespaces, snap.history_hashes)) if ns == "default" and not h)
    hit = cache.check("a paraphrase", vector=snap.vectors[i])
    assert hit.hit and hit.entry_id == snap.ids[i] and not hit.exact


def restarted(path, clock, **kwargs) -> tuple[SemanticCache, PeriodicFlush]:
    cache = new_cache(clock, **kwargs)
    flush = PeriodicFlush(path, cache, interval_s=3600)
    flush.restore()
    return cache, flush


def test_a_restart_from_the_log_equals_the_cache_at_its_last_flush(tmp_path):
    clock, path = FakeClock(), tmp_path / "log"
    cache = new_cache(clock, capacity=40, ttl_s=500)
    flush = PeriodicFlush(path, cache, interval_s=3600)
    with pytest.raises(FileNotFoundError):
        flush.restore()
    a = store(cache, range(30))
    store(cache, ["chat"], history=["hi"])
    assert flush.save()
    for round_ in range(4):
        clock.now += 10
        b = store(cache, [f"{round_}-{i}" for i in range(15)], namespace=f"ns{round_ % 2}",
                  ttl_s=15 if round_ == 1 else None)  # capacity 40: evicts the least recently used
        use_oldest(cache)
        assert cache.check("prompt chat", history=["hi"]).exact  # an exact hit moves it to the end
        if round_ == 2:
            snap = cache.snapshot()
            cleared = {i for i, ns in zip(snap.ids.tolist(), snap.namespaces) if ns == "ns0"}
            assert cache.clear("ns0") == len(cleared) > 0
        removed = b[0]
        cache.store("prompt " + f"{round_}-0", "replaced", namespace=f"ns{round_ % 2}",
                    vector=vectors(1)[0])  # replaces b[0]
        assert flush.save()
        flushed = cache.snapshot().ids.tolist()
        again, again_flush = restarted(path, clock, capacity=40, ttl_s=500)
        assert_same(cache, again)
        assert removed not in again.entries and again.check("prompt chat", history=["hi"]).hit
        store(cache, [f"lost {round_}"])  # after the flush: a crash here loses it, nothing else
        lost_copy, _ = restarted(path, clock, capacity=40, ttl_s=500)
        assert f"prompt lost {round_}" not in lost_copy.snapshot().prompts
        assert lost_copy.snapshot().ids.tolist() == flushed
    assert store(again, ["fresh"])[0] > max(a)  # ids continue the log's sequence
    assert set(a[:5]).isdisjoint(cache.snapshot().ids.tolist())  # evicted long ago, and still gone
    assert cleared.isdisjoint(again.snapshot().ids.tolist())


def test_ttl_and_capacity_drops_at_restore_are_logged_so_nothing_comes_back(tmp_path):
    clock, path = FakeClock(), tmp_path / "log"
    cache = new_cache(clock)
    flush = PeriodicFlush(path, cache, interval_s=3600)
    short = store(cache, ["short"], ttl_s=5)
    ids = store(cache, range(10))
    flush.stop(final_save=True)
    clock.now += 10  # `short` expires while the cache is down
    small, small_flush = restarted(path, clock, capacity=6)  # the 4 least recently used go
    kept = small.snapshot().ids.tolist()
    assert kept == ids[4:] and short[0] not in kept
    small.clear()
    store(small, ["after"])
    small_flush.save()
    roomy, _ = restarted(path, clock, capacity=100)  # room again: the evicted ones stay gone
    assert roomy.snapshot().prompts == ["prompt after"]


def test_compaction_folds_segments_into_one_base(tmp_path):
    clock, path = FakeClock(), tmp_path / "log"
    cache = new_cache(clock, capacity=25)
    flush = PeriodicFlush(path, cache, interval_s=3600, compact_segments=3)
    for i in range(5):
        store(cache, [f"{i}-{j}" for j in range(10)])
        use_oldest(cache)
        assert flush.save()
        clock.now += 1
    flush.stop(final_save=False)  # waits for the background compaction
    assert flush.compactions >= 1 and flush.last_error is None
    names = sorted(os.listdir(path))
    assert names[0].startswith("base-") and all(n.startswith("seg-") for n in names[1:])
    assert len(names) <= 3
    assert_same(cache, restarted(path, clock, capacity=25)[0])
    store(cache, ["last"])
    flush.save()
    assert flush.compact()
    names = os.listdir(path)
    assert len(names) == 1 and names[0].startswith("base-")
    assert_same(cache, restarted(path, clock, capacity=25)[0])


def test_leftovers_are_deleted_on_start(tmp_path):
    clock, path, cache, flush = logged(tmp_path, range(3), range(3, 5))  # base-0, seg-1
    assert flush.compact()  # base-1
    store(cache, range(5, 6))
    flush.save()  # seg-2
    assert sorted(os.listdir(path)) == [f"base-{1:012d}.arrow", f"seg-{2:012d}.arrow"]
    (path / f".seg-{3:012d}.arrow.1a2b3c4d.tmp").write_bytes(b"half a segment")  # crashed writes
    (path / f".base-{3:012d}.arrow.zz.tmp").write_bytes(b"")
    (path / f"seg-{0:012d}.arrow").write_bytes(b"superseded by base-1")  # a crash before its delete
    (path / f"base-{0:012d}.arrow").write_bytes(b"superseded too")
    again, again_flush = restarted(path, clock)
    assert_same(cache, again)
    assert sorted(os.listdir(path)) == [f"base-{1:012d}.arrow", f"seg-{2:012d}.arrow"]
    assert len(again_flush.cleaned) == 4


@pytest.mark.parametrize("damage", ["garbage", "truncated", "gap"])
def test_a_corrupt_segment_names_the_file_and_the_log_can_be_quarantined(tmp_path, damage):
    clock, path, cache, flush = logged(tmp_path, range(4), range(4, 8), range(8, 9))
    segs = sorted(n for n in os.listdir(path) if n.startswith("seg-"))
    bad = path / segs[0]
    if damage == "garbage":
        bad.write_bytes(b"not arrow at all")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-100])
    else:
        bad.unlink()
    before = sorted(os.listdir(path))
    fresh = new_cache(clock)
    starting = PeriodicFlush(path, fresh, interval_s=3600)
    with pytest.raises(SnapshotError, match=re.escape(str(bad))) as error:
        starting.restore()
    if damage != "gap":
        assert "not a valid raycache snapshot segment" in str(error.value)
    with pytest.raises(SnapshotError, match=re.escape(str(bad))):
        SemanticCache.load(path)
    aside = quarantine(path)  # what the service does on a SnapshotError
    assert not path.exists() and sorted(os.listdir(aside)) == before
    store(fresh, ["new"])
    starting.stop(final_save=True)  # the first flush after a failed restore writes a new base
    assert SemanticCache.load(path).snapshot().prompts == ["prompt new"] and os.path.isdir(aside)


def test_another_encoders_log_is_refused(tmp_path):
    clock, path, _, _ = logged(tmp_path, range(2), model_tag="model-a")
    with pytest.raises(SnapshotError, match="model-a"):
        restarted(path, clock, model_tag="model-b")


def test_a_legacy_snapshot_file_is_upgraded_to_a_log(tmp_path):
    clock, path = FakeClock(), tmp_path / "cache.npz"
    old = new_cache(clock, ttl_s=100)
    store(old, range(5), namespace="n", history=["h"])
    old.check("prompt 1", "n", ["h"])
    old.save(path)
    cache, flush = restarted(path, clock, ttl_s=100)
    assert_same(old, cache)
    assert path.is_dir() and (tmp_path / "cache.npz.snapshot-v1").is_file()
    store(cache, ["later"])
    flush.save()
    assert_same(cache, restarted(path, clock, ttl_s=100)[0])
    (tmp_path / "other.npz").write_bytes(b"garbage")  # a bad legacy file stays put for quarantine
    with pytest.raises(SnapshotError, match="not a valid raycache snapshot"):
        restarted(tmp_path / "other.npz", clock)
    assert (tmp_path / "other.npz").read_bytes() == b"garbage"


def test_a_failed_write_keeps_its_changes_for_the_next_flush(tmp_path, monkeypatch):
    clock, path, cache, flush = logged(tmp_path, range(3))
    store(cache, range(3, 6))
    before = sorted(os.listdir(path))

    def disk_full(sink, schema):
        sink.write(b"ARROW1 half a segment")
        raise OSError("disk full")

    monkeypatch.setattr(pa.ipc, "new_file", disk_full)
    assert not flush.save() and "disk full" in flush.last_error and flush.status()["pending"] == 1
    store(cache, range(6, 7))
    assert not flush.save() and flush.status()["pending"] == 2
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == before  # no torn segment, no temporary file
    cache.check("prompt 0", vector=cache.snapshot().vectors[0])
    assert flush.save() and flush.status()["pending"] == 0 and flush.last_error is None
    assert_same(cache, restarted(path, clock)[0])


def test_flushes_copy_only_the_changes_under_the_lock(tmp_path, monkeypatch):
    clock, path, _, _ = logged(tmp_path, range(200))  # the first flush writes the base
    again, again_flush = restarted(path, clock)
    monkeypatch.setattr(SemanticCache, "snapshot", lambda self: pytest.fail("a full copy under the lock"))
    store(again, ["one more"])
    assert again_flush.save()
    changes = again.take_changes()
    assert changes.empty
    store(again, ["two", "three"])
    changes = again.take_changes()
    assert len(changes.order) == 2 and len(changes.entries) == 2 and changes.stored.all()


def test_a_log_on_a_non_local_filesystem(tmp_path):
    """The generic (pyarrow filesystem) code path, as for s3://, on a SubTreeFileSystem."""
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    clock = FakeClock()
    cache = new_cache(clock)
    flush = PeriodicFlush("bucket/log", cache, interval_s=3600, filesystem=fs)
    assert not flush.log.local
    store(cache, range(5))
    flush.save()
    store(cache, range(5, 7))
    cache.clear()
    store(cache, ["x"])
    flush.save()
    again = new_cache(clock)
    PeriodicFlush("bucket/log", again, interval_s=3600, filesystem=fs).restore()
    assert_same(cache, again)
    before = sorted(os.listdir(tmp_path / "bucket" / "log"))
    aside = quarantine("bucket/log", filesystem=fs)
    assert aside.startswith("bucket/log.corrupt-") and not (tmp_path / "bucket" / "log").exists()
    assert sorted(os.listdir(tmp_path / aside)) == before and before
    with pytest.raises(FileNotFoundError):
        PeriodicFlush("bucket/log", new_cache(clock), interval_s=3600, filesystem=fs).restore()


def test_bad_arguments_are_named():
    cache = new_cache(FakeClock())
    with pytest.raises(ValueError, match="interval_s"):
        PeriodicFlush("x", cache, interval_s=0)
    with pytest.raises(ValueError, match="NUL"):
        PeriodicFlush("a\x00b", cache, interval_s=1)
    with pytest.raises(RuntimeError, match="start_journal"):
        new_cache(FakeClock()).take_changes()
