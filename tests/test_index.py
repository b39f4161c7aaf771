import numpy as np
import pytest

from raycache.index import FlatIndex, HNSWIndex, make_index


def _unit(n, d=16, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_search_finds_self_and_respects_removal(kind):
    v = _unit(300)
    index = make_index(kind, 16)
    index.add(np.arange(1000, 1300), v)
    sims, ids = index.search(v[:50], k=1)
    assert (ids[:, 0] == np.arange(1000, 1050)).mean() >= 0.98
    np.testing.assert_allclose(sims[ids[:, 0] == np.arange(1000, 1050), 0], 1.0, atol=1e-5)
    index.remove(np.arange(1000, 1010))
    assert len(index) == 290
    _, ids = index.search(v[:10], k=3)
    assert not np.isin(ids, np.arange(1000, 1010)).any()


def test_empty_index_returns_missing_slots():
    for index in (FlatIndex(4), HNSWIndex(4)):
        sims, ids = index.search(np.ones((2, 4), np.float32) / 2, k=2)
        assert (ids == -1).all() and np.isneginf(sims).all()


def test_flat_matches_brute_force():
    v, q = _unit(500, seed=1), _unit(20, seed=2)
    index = FlatIndex(16)
    index.add(np.arange(500), v)
    sims, ids = index.search(q, k=5)
    expected = np.argsort(-(q @ v.T), axis=1)[:, :5]
    assert (ids == expected).all()


def test_hnsw_compacts_tombstones_and_keeps_live_entries():
    v = _unit(400, seed=3)
    index = HNSWIndex(16)
    index.compact_min = 50
    index.add(np.arange(400), v)
    index.remove(np.arange(300))  # dead > live: the graph is rebuilt from the 100 live vectors
    assert len(index) == 100 and index._base.ntotal == 100 and not index._dead
    _, ids = index.search(v[300:], k=1)
    assert (ids[:, 0] == np.arange(300, 400)).mean() >= 0.98


def test_shape_errors_are_clear():
    index = FlatIndex(8)
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        index.add(np.arange(2), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="2 ids for 3 vectors"):
        index.add(np.arange(2), np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="unknown index kind"):
        make_index("ivf", 8)


def test_flat_removal_is_a_tombstone_compacted_in_one_pass():
    v = _unit(400, seed=4)
    index = FlatIndex(16)
    index.compact_min = 50
    index.add(np.arange(400), v)
    index.remove(np.arange(40))  # below the threshold: tombstones, no O(n) pass
    assert len(index) == 360 and index._index.ntotal == 400 and len(index._dead) == 40
    sims, ids = index.search(v[:40], k=2)
    assert not np.isin(ids, np.arange(40)).any() and (ids >= 0).all()
    index.remove(np.arange(40, 220))  # dead (220) > live (180): one compaction
    assert len(index) == 180 and index._index.ntotal == 180 and not index._dead
    _, ids = index.search(v[220:], k=1)
    assert (ids[:, 0] == np.arange(220, 400)).all()


def test_flat_tombstones_give_the_same_answers_as_removal():
    v, q = _unit(500, seed=5), _unit(30, seed=6)
    index = FlatIndex(16)
    index.add(np.arange(500), v)
    doomed = np.arange(0, 500, 3)
    index.remove(doomed)
    keep = np.setdiff1d(np.arange(500), doomed)
    expected = keep[np.argsort(-(q @ v[keep].T), axis=1)[:, :4]]
    _, ids = index.search(q, k=4)
    assert (ids == expected).all()


def test_a_removed_id_added_again_is_found_once_with_its_new_vector():
    v = _unit(3, seed=7)
    index = FlatIndex(16)
    index.add(np.arange(3), v)
    index.remove(np.array([1]))
    index.add(np.array([1]), v[2:3])
    sims, ids = index.search(v[2:3], k=3)
    assert sorted(ids[0].tolist()) == [0, 1, 2] and len(index) == 3


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_stored_vectors_can_be_read_back(kind):
    v = _unit(50, seed=8)
    index = make_index(kind, 16)
    index.add(np.arange(100, 150), v)
    index.remove(np.array([100, 101]))
    np.testing.assert_allclose(index.vectors(np.array([149, 102])), v[[49, 2]], atol=1e-6)
