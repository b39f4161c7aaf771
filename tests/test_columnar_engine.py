"""The engine's columnar layout (issue 14, part 2): entries as columns with no Python object per
entry, each vector held once (by its scope's index), amortised O(1) eviction, and entry ids that
stay unique across restarts. Behaviour is tested in test_cache.py; this file tests the layout."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from raycache.cache import LRUEviction, SemanticCache, StaticThreshold
from raycache.cache.engine import fresh_id_base

DIM = 384  # all-MiniLM-L6-v2's width: the per-entry budget is stated for it


def unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(cache: SemanticCache, n: int, seed: int = 0, batch: int = 500) -> list[int]:
    vectors, ids = unit(n, seed), []
    for lo in range(0, n, batch):
        names = [f"prompt {i}" for i in range(lo, min(lo + batch, n))]
        ids += cache.store_batch(names, [f"r{i}" for i in range(lo, lo + len(names))],
                                 vectors=vectors[lo:lo + len(names)])
    return ids


def test_no_python_object_per_entry():
    cache = SemanticCache(None, DIM, policy=StaticThreshold(0.9))
    fill(cache, 200)
    gc.collect()
    before = len(gc.get_objects())
    fill(cache, 5_000, seed=1)
    gc.collect()
    assert len(cache) == 5_000  # the first 200 prompts were stored again (replaced)
    assert len(gc.get_objects()) - before < 200  # texts and ints are not gc-tracked; entries were


def test_each_vector_is_held_once_and_python_side_bytes_per_entry_are_small():
    cache = SemanticCache(None, DIM, policy=StaticThreshold(0.9))
    fill(cache, 500)
    n = 5_000
    vectors = unit(n, 2)
    names = [f"p{i:06d}" for i in range(n)]  # short texts: what is measured is the entry overhead
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    for lo in range(0, n, 500):
        cache.store_batch(names[lo:lo + 500], names[lo:lo + 500], vectors=vectors[lo:lo + 500])
    end, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_entry = (end - start) / n  # numpy columns, dicts, lists, texts; FAISS's copy is not traced
    print(f"python-side bytes per entry: {per_entry:.0f}")
    assert per_entry < 4 * DIM / 2, per_entry  # far below one more float32 copy of the vector (1,536 B)


def test_flat_eviction_keeps_the_index_bounded_and_finds_live_entries():
    cache = SemanticCache(None, DIM, eviction=LRUEviction(100), policy=StaticThreshold(0.99))
    vectors = unit(5_000, 3)
    for lo in range(0, 5_000, 50):
        cache.store_batch([f"q{i}" for i in range(lo, lo + 50)], [f"r{i}" for i in range(lo, lo + 50)],
                          vectors=vectors[lo:lo + 50])
    (index,) = cache._indexes.values()
    assert len(cache) == 100 and len(index) == 100
    assert index._index.ntotal <= 100 + index.compact_min + 1  # tombstones compacted in one pass
    results = cache.check_batch([f"x{i}" for i in range(100)], vectors=vectors[-100:])
    assert all(r.hit for r in results) and [r.response for r in results] == [f"r{i}" for i in range(4_900, 5_000)]
    assert not any(r.hit for r in cache.check_batch(["old"], vectors=vectors[:1]))


def test_entry_ids_are_unique_across_restarts_and_json_safe(tmp_path):
    first = SemanticCache(None, DIM)
    second = SemanticCache(None, DIM)
    a = fill(first, 10)
    b = fill(second, 10)
    assert not set(a) & set(b)  # independently started caches (restarts without a snapshot, shards)
    assert all(0 < i < 2**53 for i in a + b) and a == sorted(a) and len(set(a)) == 10
    assert fresh_id_base() != fresh_id_base() or fresh_id_base() != fresh_id_base()
    first.save(tmp_path / "c.npz")
    restored = SemanticCache.load(tmp_path / "c.npz")
    c = restored.store("a new prompt", "n", vector=unit(1, 9)[0])
    assert c > max(a)  # a restored cache continues its snapshot's sequence


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_snapshot_reads_each_vector_back_from_its_scope_index(tmp_path, index):
    cache = SemanticCache(None, DIM, index=index, eviction=LRUEviction(300), policy=StaticThreshold(0.9))
    vectors = unit(400, 4)
    for i, v in enumerate(vectors):
        cache.store(f"p{i}", f"r{i}", namespace=f"ns{i % 3}", history=None if i % 2 else [f"h{i % 5}"],
                    vector=v)
    snap = cache.snapshot()
    assert len(snap) == 300 and list(snap.ids) == sorted(snap.ids)  # LRU first = oldest first here
    by_prompt = {p: snap.vectors[j] for j, p in enumerate(snap.prompts)}
    np.testing.assert_allclose(by_prompt["p399"], vectors[399], atol=1e-6)
    np.testing.assert_allclose(by_prompt["p100"], vectors[100], atol=1e-6)
    cache.save(tmp_path / "c.npz")
    loaded = SemanticCache.load(tmp_path / "c.npz", index=index, policy=StaticThreshold(0.9))
    assert len(loaded) == 300
    found = loaded.check("query", namespace="ns0", history=["h2"], vector=vectors[392])
    expected = cache.check("query", namespace="ns0", history=["h2"], vector=vectors[392])
    assert (found.hit, found.entry_id) == (expected.hit, expected.entry_id)
    for i in (399, 350, 101):
        ns, history = f"ns{i % 3}", None if i % 2 else [f"h{i % 5}"]
        got = loaded.check(f"x{i}", namespace=ns, history=history, vector=vectors[i])
        assert got.hit and got.response == f"r{i}" and got.similarity == pytest.approx(1, abs=1e-5)


def test_a_batched_add_stores_what_one_add_per_entry_stores():
    """EntryStore.add_many (a restore's path) = add + touch per entry, into an empty store and
    into one with entries and free slots."""
    from raycache.cache.scope import Scope
    from raycache.cache.store import EntryStore, text_key

    def rows(store: EntryStore, ids) -> list:
        out = []
        for i in ids:
            s = store.slot(i)
            out.append((store.prompts[s], store.responses[s], store.scope_of(s), store.created_at[s],
                        store.last_access[s], np.nan_to_num(store.expires_at[s], nan=-1.0),
                        store.exact_keys[s].tobytes()))
        return out

    scope = Scope("tenant", "h1")
    prompts = [f"p {i}" for i in range(40)]
    keys = [text_key(p) for p in prompts]
    created, used = np.arange(40.0), np.arange(40.0) + 100
    expires = np.where(np.arange(40) % 3 == 0, np.nan, 500.0)
    for before in (0, 7):  # an empty store; one holding entries, with a freed slot
        one, many = EntryStore(initial_slots=16), EntryStore(initial_slots=16)
        for store in (one, many):
            for j in range(before):
                store.add(1000 + j, f"old {j}", "r", Scope("other", ""), 0.0, None, text_key(f"old {j}"))
            if before:
                store.remove(1000)
        for i in range(40):
            slot = one.add(i + 1, prompts[i], f"r{i}", scope, created[i],
                           None if np.isnan(expires[i]) else expires[i], keys[i])
            one.touch(slot, used[i])
        many.add_many(np.arange(1, 41), prompts, [f"r{i}" for i in range(40)], scope, keys, created, used, expires)
        assert len(many) == len(one) == 40 + max(before - 1, 0)
        assert rows(many, range(1, 41)) == rows(one, range(1, 41))
        assert many.find_exact(scope, keys[5]) == many.slot(6) and many.scope_size(scope) == 40
        with pytest.raises(ValueError, match="unique"):
            many.add_many(np.array([3]), ["x"], ["y"], scope, [text_key("x")], *np.zeros((3, 1)))
