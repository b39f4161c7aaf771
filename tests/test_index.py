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
        make_index("annoy", 8)


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


@pytest.mark.parametrize("n_queries", [1, 3, 16, 40])
def test_flat_top1_matrix_product_matches_the_faiss_scan(n_queries):
    """FlatIndex's numpy top-1 path (taken where matmul_wins) returns what FAISS's scan returns,
    tombstones included: many dead rows among the queries' nearest, and a fully dead index."""
    from raycache import index as index_module
    from raycache.index import _search_live

    rng = np.random.default_rng(n_queries)
    x = rng.standard_normal((3_000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = FlatIndex(16)
    index.add(np.arange(10, 3_010), x)
    queries = x[:n_queries] + 0.01 * rng.standard_normal((n_queries, 16)).astype(np.float32)
    index.remove(np.arange(10, 10 + n_queries))  # each query's own row: its best is dead
    index.remove(rng.choice(np.arange(10 + n_queries, 3_010), 400, replace=False))
    for max_cells in (index_module.MATMUL_MAX_CELLS, 3_000 * 2):  # one product, or chunks of two queries
        index_module.MATMUL_MAX_CELLS = max_cells
        try:
            sims, ids = index.search(queries, 1)
        finally:
            index_module.MATMUL_MAX_CELLS = 1 << 24
        ref_s, ref_i = _search_live(index._index, queries, 1, index._dead, len(index))
        assert np.array_equal(ids, ref_i) and np.allclose(sims, ref_s, atol=1e-5)
        assert not set(ids[:, 0].tolist()) & index._dead
    index.remove(np.arange(10, 3_010))
    assert index.search(queries, 1)[1].tolist() == [[-1]] * n_queries


def test_matmul_rule_takes_the_measured_side():
    from raycache.index import matmul_wins

    assert matmul_wins(1, 100) and matmul_wins(64, 100) and matmul_wins(4, 1_000_000)
    assert not matmul_wins(4, 1_000)


def test_flat_top1_skips_a_run_of_tombstoned_duplicates():
    """12 copies of the query's vector, the first 11 tombstoned: the live copy is found (past the
    8 one-by-one skips, by masking every tombstone)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = FlatIndex(16)
    index.add(np.arange(1, 13), np.repeat(x[:1], 12, axis=0))
    index.add(np.arange(100, 300), x)
    index.remove(np.arange(1, 12))
    index.remove(np.array([100]))  # x[0] itself
    sims, ids = index.search(x[:1], 1)
    assert ids.tolist() == [[12]] and sims[0, 0] == pytest.approx(1.0, abs=1e-5)
