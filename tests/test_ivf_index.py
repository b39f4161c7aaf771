"""IVFIndex: exact until it has data to train on, then inverted lists; tombstones, read-back,
retraining on growth, and the engine and config around it."""

from __future__ import annotations

import numpy as np
import pytest

from raycache.cache import LRUEviction, SemanticCache, StaticThreshold
from raycache.config import CacheConfig
from raycache.index import IVFIndex, make_index


def clustered(n: int, dim: int = 16, seed: int = 0, groups: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim)).astype(np.float32)
    x = centres[rng.integers(0, groups, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def small(nlist: int = 4, nprobe: int = 4) -> IVFIndex:
    index = make_index("ivf", 16, nlist=nlist, nprobe=nprobe)
    assert isinstance(index, IVFIndex) and index.train_size == IVFIndex.TRAIN_PER_LIST * nlist
    return index


def test_exact_until_trained_then_lists_that_find_every_stored_vector():
    v = clustered(400)
    index = small()
    index.add(np.arange(1, 101), v[:100])
    assert index.trained_on == 0 and index._ivf is None  # 100 < 39 * 4: still a flat index
    assert (index.search(v[:100], 1)[1][:, 0] == np.arange(1, 101)).all()
    index.add(np.arange(101, 401), v[100:])  # crosses the training size: trained once on all 400
    assert index.trained_on == 400 and index._flat is None and index._ivf.ntotal == 400
    sims, ids = index.search(v, 1)  # nprobe = nlist: every list scanned, so exact
    assert (ids[:, 0] == np.arange(1, 401)).all()
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    assert len(index) == 400


def test_probing_fewer_lists_is_approximate_but_finds_near_copies():
    v = clustered(2_000, seed=1)
    index = small(nlist=16, nprobe=2)
    index.add(np.arange(2_000), v)
    assert index.trained_on == 2_000
    rng = np.random.default_rng(2)
    queries = v[:200] + 0.01 * rng.standard_normal((200, 16)).astype(np.float32)
    assert (index.search(queries, 1)[1][:, 0] == np.arange(200)).mean() >= 0.95


def test_tombstones_are_never_returned_and_vectors_read_back():
    v = clustered(300, seed=3)
    index = small()
    index.add(np.arange(10, 310), v)
    index.remove(np.arange(10, 60))
    assert len(index) == 250 and index._ivf.ntotal == 300  # tombstones, no pass over the lists yet
    _, ids = index.search(v[:50], k=3)
    assert not np.isin(ids, np.arange(10, 60)).any() and (ids >= 0).all()
    np.testing.assert_allclose(index.vectors(np.array([309, 60, 200])), v[[299, 50, 190]], atol=1e-6)
    with pytest.raises(KeyError):
        index.vectors(np.array([10]))  # removed
    with pytest.raises(KeyError):
        index.vectors(np.array([5_000]))  # never stored
    assert index.vectors(np.zeros(0, np.int64)).shape == (0, 16)


def test_a_fully_tombstoned_neighbourhood_answers_missing_without_scanning_everything():
    v = clustered(400, seed=4)
    index = small(nprobe=1)
    index.compact_min = 10_000
    index.add(np.arange(400), v)
    index.remove(np.arange(399))
    assert len(index._dead) == 399 and len(index) == 1
    sims, ids = index.search(v[:20], 1)
    # each answer is the one live entry (where its list was probed) or missing, never a tombstone
    assert set(ids[:, 0].tolist()) <= {399, -1}


def test_compaction_drops_tombstones_and_retrains_a_grown_index():
    v = clustered(1_000, seed=5)
    index = small()
    index.compact_min = 10
    index.add(np.arange(200), v[:200])
    assert index.trained_on == 200
    index.add(np.arange(200, 1_000), v[200:])  # grown 5x since training
    index.remove(np.arange(0, 1_000, 2)[:260])  # dead (260) > live (740)? no: no compaction yet
    assert index._dead and index.trained_on == 200
    index.remove(np.arange(1, 1_000, 2)[:300])  # dead 560 > live 440: compaction
    assert not index._dead and index._ivf.ntotal == 440 == len(index)
    assert index.trained_on == 200  # 440 < 4 x 200: the same centroids
    index.add(np.arange(1_000, 1_400), clustered(400, seed=6))
    index.remove(np.arange(1_000, 1_010))
    index.compact()  # 830 live >= 4 x 200: retrained on the live vectors
    assert index.trained_on == 830 == len(index) and not index._dead
    live = np.setdiff1d(np.arange(1_400), np.concatenate([np.arange(0, 1_000, 2)[:260],
                                                          np.arange(1, 1_000, 2)[:300], np.arange(1_000, 1_010)]))
    assert (index.search(index.vectors(live), 1)[1][:, 0] == live).all()


def test_a_removed_id_added_again_is_found_once_with_its_new_vector():
    v = clustered(200, seed=7)
    index = small()
    index.add(np.arange(200), v)
    index.remove(np.array([1]))
    index.add(np.array([1]), v[2:3])
    assert len(index) == 200
    _, ids = index.search(v[2:3], k=3)
    assert sorted(ids[0].tolist())[:2] == [1, 2] and ids[0].tolist().count(1) == 1
    np.testing.assert_allclose(index.vectors(np.array([1])), v[2:3], atol=1e-6)


def test_a_restore_sized_batch_trains_directly():
    v = clustered(500, seed=8)
    index = small()
    index.add(np.arange(1, 501), v)
    assert index.trained_on == 500 and index._flat is None


def test_engine_with_ivf_round_trips_a_snapshot(tmp_path):
    v = clustered(600, dim=32, seed=9)
    params = {"nlist": 4, "nprobe": 4}
    cache = SemanticCache(None, 32, index="ivf", index_params=params, eviction=LRUEviction(500),
                          policy=StaticThreshold(0.95))
    cache.store_batch([f"p{i}" for i in range(600)], [f"r{i}" for i in range(600)], vectors=v)
    (index,) = cache._indexes.values()
    assert isinstance(index, IVFIndex) and index.trained_on > 0 and len(cache) == 500
    cache.save(tmp_path / "c.npz")
    loaded = SemanticCache.load(tmp_path / "c.npz", index="ivf", index_params=params,
                                policy=StaticThreshold(0.95))
    assert len(loaded) == 500
    for i in (599, 300, 100):
        got = loaded.check(f"q{i}", vector=v[i])
        assert got.hit and got.response == f"r{i}"
    assert loaded.check("q0", vector=v[0]).response != "r0"  # evicted before the save


def test_ivf_parameters_come_from_the_config_and_are_checked():
    cache = SemanticCache.from_config(CacheConfig(index="ivf", ivf_nlist=8, ivf_nprobe=3), dim=16)
    cache.store("p", "r", vector=clustered(1)[0])
    (index,) = cache._indexes.values()
    assert (index.nlist, index.nprobe) == (8, 3)
    with pytest.raises(ValueError, match="unknown index parameter"):
        make_index("ivf", 8, m=4)
    with pytest.raises(ValueError, match="nprobe must be a positive integer"):
        make_index("ivf", 8, nprobe=0)
