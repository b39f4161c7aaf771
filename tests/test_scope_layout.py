"""One index per namespace: entries without history live in the namespace's index, those of
conversation (history) and tail scopes are searched exactly among their own scope's rows until the
scope reaches ``scope_index_min`` entries, when it gets an index of its own. Lookups never cross
scopes on either path; eviction, clear, TTL and snapshots work across both."""

from __future__ import annotations

import numpy as np
import pytest

from raycache.cache import LRUEviction, SemanticCache, StaticThreshold
from raycache.cache.scope import make_scope
from raycache.cache.scope_rows import ScopeRows
from raycache.config import CacheConfig, ConfigError, build_config
from raycache.index import FlatIndex, make_index

DIM = 32


def unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lookup(cache: SemanticCache, vectors: np.ndarray, histories: list, tails: list | None = None,
           namespace: str = "default"):
    """check_batch with explicit tail keys (begin_lookup / complete_lookup): no exact-tier answer,
    the prompts are fresh texts."""
    pending = cache.begin_lookup([f"query {i}" for i in range(len(vectors))], namespace, histories)
    return cache.complete_lookup(pending, vectors[pending.need],
                                 [(tails or [""] * len(vectors))[i] for i in pending.need])


@pytest.mark.parametrize("index", ["flat", "hnsw"])
@pytest.mark.parametrize("scope_index_min", [2, 4, 1024])
def test_lookups_find_the_nearest_entry_of_their_own_scope_only(index, scope_index_min):
    """30 histories x 1-6 entries plus tails and a history-less bulk: every lookup returns the
    exact nearest entry of its own scope (brute force over that scope), whichever path holds it."""
    cache = SemanticCache(None, DIM, index=index, policy=StaticThreshold(-1.0),
                          scope_index_min=scope_index_min)
    rng = np.random.default_rng(1)
    scopes = [(None, "")] + [([f"turn {h}"], "") for h in range(30)] + [(["turn 0"], "tail-a"), (None, "tail-b")]
    held: dict[tuple, list[tuple[int, np.ndarray]]] = {}
    vectors = unit(400, 2)
    for i, v in enumerate(vectors[:200]):
        history, tail = scopes[int(rng.integers(len(scopes)))] if i >= len(scopes) else scopes[i]
        entry_id = cache.store(f"p{i}", f"r{i}", history=history, vector=v, tail=tail)
        held.setdefault((str(history), tail), []).append((entry_id, v))
    queries = vectors[200:200 + len(scopes)]
    results = lookup(cache, queries, [h for h, _ in scopes], [t for _, t in scopes])
    for (history, tail), query, result in zip(scopes, queries, results):
        own = held[(str(history), tail)]
        sims = np.array([v @ query for _, v in own])
        assert result.hit and result.entry_id == own[int(sims.argmax())][0]
        assert result.similarity == pytest.approx(float(sims.max()), abs=1e-5)
    sizes = {key: len(entries) for key, entries in held.items()}
    indexed = {scope.history_hash for scope in cache._indexes}
    assert "" in indexed  # the namespace's own index
    big = sum(size >= scope_index_min for (h, t), size in sizes.items() if (h, t) != ("None", ""))
    assert len(cache._indexes) == 1 + big  # histories below the threshold have no index
    assert cache.stats()["scopes"] == len(sizes) and cache.stats()["scope_indexes"] == 1 + big
    assert lookup(cache, queries[:1], [["never seen"]])[0].entry_id is None


def test_ten_thousand_histories_share_one_index():
    cache = SemanticCache(None, DIM, policy=StaticThreshold(0.99))
    vectors = unit(3_000, 3)
    cache.store_batch([f"p{i}" for i in range(3_000)], ["r"] * 3_000,
                      histories=[None if i < 1_000 else [f"conversation {i % 1_000}"] for i in range(3_000)],
                      vectors=vectors)
    assert len(cache._indexes) == 1 and len(cache._rows) == 2_000 and cache._rows.scopes() == 1_000
    same = lookup(cache, vectors[1_000:1_010], [[f"conversation {i % 1_000}"] for i in range(1_000, 1_010)])
    assert all(r.hit for r in same)
    other = lookup(cache, vectors[1_000:1_010], [[f"conversation {i % 1_000 + 1}"] for i in range(1_000, 1_010)])
    assert not any(r.hit for r in other)  # the same vector in the next conversation: not its scope


@pytest.mark.parametrize("scope_index_min", [3, 1024])
def test_eviction_clear_and_ttl_reach_both_paths(scope_index_min):
    clock = Clock()
    cache = SemanticCache(None, DIM, eviction=LRUEviction(40), policy=StaticThreshold(0.99),
                          clock=clock, scope_index_min=scope_index_min)
    vectors = unit(120, 4)
    histories = [None if i % 3 == 0 else [f"h{i % 5}"] for i in range(120)]
    for i in range(120):  # 80 evictions, oldest first
        cache.store(f"p{i}", f"r{i}", history=histories[i], vector=vectors[i])
    assert len(cache) == 40 and cache.stats()["evictions"] == 80
    live = lookup(cache, vectors[80:], histories[80:])
    assert [r.response for r in live] == [f"r{i}" for i in range(80, 120)]
    assert not any(r.hit for r in lookup(cache, vectors[:80], histories[:80]))
    assert len(cache._rows) + sum(len(ix) for ix in cache._indexes.values()) == 40

    cache.store("ns2", "other", namespace="two", history=["h1"], vector=vectors[0])  # evicts one more
    assert cache.clear("default") == 39
    assert len(cache) == 1 and len(cache._rows) == 1 and not cache._indexes
    assert lookup(cache, vectors[:1], [["h1"]], namespace="two")[0].response == "other"
    assert not any(r.hit for r in lookup(cache, vectors[80:], histories[80:]))

    for i in range(20):
        cache.store(f"t{i}", f"t{i}", history=histories[i], vector=vectors[i], ttl_s=10 if i % 2 else None)
    clock.now += 11
    assert len(cache) == 11 and cache.stats()["expirations"] == 10
    kept = lookup(cache, vectors[:20], histories[:20])
    assert [r.response for r in kept] == [None if i % 2 else f"t{i}" for i in range(20)]


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_snapshot_round_trip_keeps_both_paths(tmp_path, index):
    cache = SemanticCache(None, DIM, index=index, policy=StaticThreshold(-1.0), scope_index_min=4)
    vectors = unit(60, 5)
    histories = [None if i < 20 else [f"h{i % 8}"] for i in range(60)]  # 5 per history: indexed
    histories[-3:] = [["lonely"], ["lonely"], ["solo"]]  # small scopes: rows
    cache.store_batch([f"p{i}" for i in range(60)], [f"r{i}" for i in range(60)], histories=histories,
                      vectors=vectors)
    before = lookup(cache, vectors, histories)
    snap = cache.snapshot()
    assert np.allclose(snap.vectors[np.argsort(snap.ids)], vectors, atol=1e-6)
    cache.save(tmp_path / "cache.npz")
    restored = SemanticCache.load(tmp_path / "cache.npz", index=index, policy=StaticThreshold(-1.0),
                                  scope_index_min=4)
    after = lookup(restored, vectors, histories)
    assert [r.entry_id for r in after] == [r.entry_id for r in before]
    assert [r.response for r in after] == [f"r{i}" for i in range(60)]
    assert set(restored._indexes) == set(cache._indexes) and len(restored._rows) == len(cache._rows) == 3


def test_scope_rows_compact_and_break_ties_to_the_oldest():
    rows = ScopeRows(DIM)
    vectors = unit(500, 6)
    a, b = make_scope("n", ["a"]), make_scope("n", ["b"])
    rows.add(a, np.arange(1, 501), vectors)
    rows.add(b, np.array([1000, 1001]), np.stack([vectors[0], vectors[0]]))
    assert rows.search(b, vectors[:1])[1].tolist() == [1000]  # equal similarity: the older entry
    for entry_id in range(1, 481):
        assert rows.remove(a, entry_id)
    assert len(rows) == 22 and rows.nbytes <= 2 * 64 * (DIM * 4 + 8)  # compacted to the live rows
    sims, ids = rows.search(a, vectors[480:])
    assert ids.tolist() == list(range(481, 501)) and np.allclose(sims, 1.0, atol=1e-5)
    assert np.array_equal(rows.vectors(np.array([1000, 500])), np.stack([vectors[0], vectors[499]]))
    assert rows.pop(b)[0].tolist() == [1000, 1001] and b not in rows and rows.scopes() == 1
    assert rows.search(b, vectors[:2])[1].tolist() == [-1, -1]


def test_hnsw_parameters_come_from_the_config():
    cfg = CacheConfig(index="hnsw", hnsw_m=8, hnsw_ef_construction=40, hnsw_ef_search=17, scope_index_min=7)
    cache = SemanticCache.from_config(cfg, dim=DIM)
    cache.store("p", "r", vector=unit(1)[0])
    (index,) = cache._indexes.values()
    assert (index.m, index.ef_construction, index.ef_search) == (8, 40, 17)
    assert index._base.hnsw.efSearch == 17 and cache.scope_index_min == 7


@pytest.mark.parametrize("field, value", [("hnsw_m", 1), ("hnsw_ef_search", 0), ("hnsw_ef_construction", -3),
                                          ("scope_index_min", 1), ("hnsw_m", "many")])
def test_bad_index_settings_are_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        build_config(CacheConfig, {field: value})


def test_bad_index_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="ef_search must be a positive integer"):
        make_index("hnsw", 8, ef_search=0)
    with pytest.raises(ValueError, match="unknown index parameter"):
        make_index("hnsw", 8, nprobe=4)
    with pytest.raises(ValueError, match="scope_index_min"):
        SemanticCache(None, DIM, scope_index_min=1)
    with pytest.raises(ValueError, match="m must be a positive integer"):
        SemanticCache(None, DIM, index="hnsw", index_params={"m": 0})
    assert isinstance(make_index("flat", 8, m=None), FlatIndex)
