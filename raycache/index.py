"""Vector indexes over L2-normalised float32 vectors (inner product = cosine), backed by FAISS.

FAISS is used rather than hand-written search: its flat inner-product kernel is BLAS-backed and its
HNSW graph is the standard ANN structure. Both indexes map caller-chosen int64 ids to vectors and
support incremental ``add`` / ``remove``; both remove by tombstone, filtered at search time and
compacted in one pass once tombstones outnumber the live entries (amortised O(1) per removal).
"""

from __future__ import annotations

from typing import Protocol

import faiss
import numpy as np


class VectorIndex(Protocol):
    """Incremental id -> vector index. Vectors [n, dim] float32, ids [n] int64."""

    dim: int

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """-> (similarities [m, k] float32, ids [m, k] int64); missing slots are (-inf, -1)."""
        ...

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` -> float32 [len(ids), dim] (the engine keeps no copy)."""
        ...

    def __len__(self) -> int: ...


def _as_vectors(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape [n, {dim}], got {x.shape}")
    return x


def _as_ids(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def _search_live(index, queries: np.ndarray, k: int, dead: set, live: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """k nearest live ids of each query from a FAISS ``index`` that may still hold tombstoned
    (``dead``) ids: asks for a few more than ``k`` and looks further for the queries whose results
    were mostly tombstones. Order among equal similarities is FAISS's (insertion order)."""
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    if live <= 0:
        return out_s, out_i
    total = int(index.ntotal)
    if not dead:
        sims, ids = index.search(queries, min(k, total))
        found = ids >= 0
        out_s[:, :ids.shape[1]][found], out_i[:, :ids.shape[1]][found] = sims[found], ids[found]
        return out_s, out_i
    pending = np.arange(len(queries))
    kk = min(k + min(len(dead), 64), total)
    while len(pending):
        sims, ids = index.search(queries[pending], kk)
        short = []
        for row, r in enumerate(pending):
            j = 0
            for s, i in zip(sims[row], ids[row]):
                if i < 0 or int(i) in dead:
                    continue
                out_s[r, j], out_i[r, j] = s, i
                j += 1
                if j == k:
                    break
            if j < k and kk < total:  # tombstones hid live entries: look further
                short.append(r)
        pending = np.asarray(short, dtype=np.int64)
        kk = min(kk * 4, total)
    return out_s, out_i


def _gather(external: np.ndarray, base, ids: np.ndarray, dim: int,
            positions: "np.ndarray | None" = None) -> np.ndarray:
    """Rows of ``base`` (a FAISS index storing raw vectors) for ``ids``; ``external[j]`` is the id
    of row ``positions[j]`` (``positions`` None: row j). KeyError for an id it does not hold."""
    if positions is None:
        positions = np.arange(len(external))
    if not len(ids):
        return np.zeros((0, dim), np.float32)
    if not len(external):
        raise KeyError("some ids are not in the index")
    sorter = np.argsort(external, kind="stable")
    at = np.searchsorted(external, ids, sorter=sorter)
    at = np.minimum(at, len(external) - 1)
    found = sorter[at]
    if not np.array_equal(external[found], ids):
        raise KeyError("some ids are not in the index")
    rows = positions[found]
    out = np.empty((len(ids), dim), np.float32)
    for start in range(0, len(rows), 4096):  # bounded temporary copies
        chunk = rows[start:start + 4096]
        lo, hi = int(chunk.min()), int(chunk.max()) + 1
        if hi - lo <= 4 * len(chunk):
            out[start:start + len(chunk)] = base.reconstruct_n(lo, hi - lo)[chunk - lo]
        else:
            for j, r in enumerate(chunk.tolist()):
                out[start + j] = base.reconstruct(r)
    return out


MATMUL_MAX_CELLS = 1 << 24
"""Similarities [queries, rows] one numpy matrix product of FlatIndex may hold (64 MiB float32)."""


def matmul_wins(queries: int, rows: int) -> bool:
    """Whether a numpy matrix product (+ argmax) beats FAISS's flat scan for a top-1 search of
    ``queries`` against ``rows`` vectors. Measured (dim 384, 2 cores; ``bench/flat_search.py``):
    numpy wins for one query (BLAS gemv against FAISS's single-threaded scan) and for batches of 16
    or more (one gemm; FAISS adds a heap pass per block), FAISS for 2-15 queries over small indexes."""
    return queries == 1 or queries >= 16 or rows >= 16_384


def _top1_matmul(queries: np.ndarray, xb: np.ndarray, external: np.ndarray, dead: set
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest live row of ``xb`` [n, dim] to each query [m, dim] by one matrix product per chunk
    -> (similarities [m], ids [m]; (-inf, -1) when none is live). ``external[j]``: the id of row j;
    ``dead``: tombstoned ids (a query whose best row is one looks at its next best, and so on).
    Ties go to the earliest row, as in FAISS."""
    out_s = np.full(len(queries), -np.inf, np.float32)
    out_i = np.full(len(queries), -1, np.int64)
    if not len(xb):
        return out_s, out_i
    step = max(1, MATMUL_MAX_CELLS // len(xb))
    for lo in range(0, len(queries), step):
        sims = queries[lo:lo + step] @ xb.T  # [chunk, n]
        rows = np.arange(len(sims))
        best = sims.argmax(axis=1)
        if dead:
            for _ in range(8):  # tombstones are few among a query's best rows: skip them one by one
                hidden = rows[[int(i) in dead for i in external[best[rows]].tolist()]]
                if not len(hidden):
                    break
                sims[hidden, best[hidden]] = -np.inf
                best[hidden] = sims[hidden].argmax(axis=1)
                rows = hidden
            else:  # still hidden after 8: mask every tombstone for those queries
                mask = np.isin(external, np.fromiter(dead, np.int64, len(dead)))
                sims[np.ix_(rows, np.flatnonzero(mask))] = -np.inf
                best[rows] = sims[rows].argmax(axis=1)
        top = sims[np.arange(len(sims)), best]
        found = top > -np.inf
        out_s[lo:lo + len(sims)][found] = top[found]
        out_i[lo:lo + len(sims)][found] = external[best[found]]
    return out_s, out_i


class FlatIndex:
    """Exact inner-product search (faiss IndexFlatIP behind an id map).

    Removal is a tombstone (O(1)), filtered at search time; the tombstoned rows are dropped in one
    pass once they outnumber ``max(compact_min, live entries)``, so removing costs amortised O(1)
    instead of one O(n) ``remove_ids`` per entry. Top-1 searches run as one numpy matrix product
    over FAISS's own storage where that is faster (:func:`matmul_wins`).
    """

    compact_min = 1024
    """Tombstones tolerated before a compaction is considered (its cost ~ the index size)."""

    def __init__(self, dim: int):
        self.dim = dim
        self._flat = faiss.IndexFlatIP(self.dim)
        self._index = faiss.IndexIDMap2(self._flat)
        self._dead: set[int] = set()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vecs, ids = _as_vectors(vectors, self.dim), _as_ids(ids)
        if len(ids) != len(vecs):
            raise ValueError(f"{len(ids)} ids for {len(vecs)} vectors")
        if self._dead:
            again = [i for i in ids.tolist() if i in self._dead]
            if again:  # an id coming back: drop its old row for good first
                self._index.remove_ids(np.asarray(again, np.int64))
                self._dead.difference_update(again)
        self._index.add_with_ids(vecs, ids)

    def remove(self, ids: np.ndarray) -> None:
        """Tombstone ``ids`` (ids it does not hold are ignored only when no compaction is due:
        callers remove what they added)."""
        self._dead.update(_as_ids(ids).tolist())
        if len(self._dead) > max(self.compact_min, len(self)):
            self.compact()

    def compact(self) -> None:
        """Drop every tombstoned row (one pass over the index; insertion order kept)."""
        if self._dead:
            self._index.remove_ids(np.fromiter(self._dead, np.int64, len(self._dead)))
            self._dead.clear()

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        queries = _as_vectors(queries, self.dim)
        total = int(self._index.ntotal)
        if k == 1 and total and matmul_wins(len(queries), total):
            xb = faiss.rev_swig_ptr(self._flat.get_xb(), total * self.dim).reshape(total, self.dim)
            external = faiss.rev_swig_ptr(self._index.id_map.data(), total)  # views, no copy
            sims, ids = _top1_matmul(queries, xb, external, self._dead)
            return sims[:, None], ids[:, None]
        return _search_live(self._index, queries, k, self._dead, len(self))

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (live ids only), float32 [len(ids), dim]."""
        return _gather(faiss.vector_to_array(self._index.id_map), self._flat, _as_ids(ids), self.dim)

    def __len__(self) -> int:
        return int(self._index.ntotal) - len(self._dead)


class HNSWIndex:
    """Approximate search with an HNSW graph; removal by tombstones (compacted on demand).

    ``m``: graph degree; ``ef_search``: search breadth (recall vs latency).
    """

    def __init__(self, dim: int, m: int = 32, ef_construction: int = 80, ef_search: int = 64):
        self.dim, self.m, self.ef_construction, self.ef_search = dim, m, ef_construction, ef_search
        self._reset()

    def _reset(self) -> None:
        base = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = self.ef_construction
        base.hnsw.efSearch = self.ef_search
        self._base = base
        self._index = faiss.IndexIDMap(base)
        self._dead: set[int] = set()
        self._live = 0

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vecs, ids = _as_vectors(vectors, self.dim), _as_ids(ids)
        if len(ids) != len(vecs):
            raise ValueError(f"{len(ids)} ids for {len(vecs)} vectors")
        self._dead.difference_update(ids.tolist())
        self._index.add_with_ids(vecs, ids)
        self._live += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        """Tombstone ``ids``; the graph is rebuilt without them once they outnumber the live ones."""
        for i in _as_ids(ids).tolist():
            if i not in self._dead:
                self._dead.add(i)
                self._live -= 1
        if len(self._dead) > max(self.compact_min, self._live):
            self.compact()

    compact_min = 1024
    """Tombstones tolerated before a rebuild is considered (rebuild cost ~ live entries)."""

    def _live_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the graph, external ids) of the live vectors."""
        external = faiss.vector_to_array(self._index.id_map)
        keep = np.flatnonzero(~np.isin(external, np.fromiter(self._dead, np.int64, len(self._dead))))
        return keep, external[keep]

    def compact(self) -> None:
        """Rebuild the graph from the live vectors only (drops every tombstone)."""
        keep, ids = self._live_rows()
        vectors = (np.stack([self._base.reconstruct(int(i)) for i in keep]) if len(keep)
                   else np.zeros((0, self.dim), np.float32))
        self._reset()
        if len(ids):
            self.add(ids, vectors)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        return _search_live(self._index, _as_vectors(queries, self.dim), k, self._dead, self._live)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (live ids only), float32 [len(ids), dim]."""
        keep, external = self._live_rows()
        return _gather(external, self._base, _as_ids(ids), self.dim, keep)

    def __len__(self) -> int:
        return max(self._live, 0)


HNSW_PARAMS = ("m", "ef_construction", "ef_search")
"""The HNSW parameters ``make_index`` takes (``cache.hnsw_*`` in the config)."""


def make_index(kind: str, dim: int, **params: int) -> VectorIndex:
    """'flat' (exact, default) or 'hnsw' (approximate, for large caches).

    ``params`` (hnsw only; None = the default): ``m`` graph degree, ``ef_construction`` build
    breadth, ``ef_search`` search breadth (recall vs latency); each a positive integer.
    """
    if kind not in ("flat", "hnsw"):
        raise ValueError(f"unknown index kind {kind!r}; expected 'flat' or 'hnsw'")
    unknown = sorted(set(params) - set(HNSW_PARAMS))
    if unknown:
        raise ValueError(f"unknown index parameter(s) {unknown}; expected some of {list(HNSW_PARAMS)}")
    params = {name: value for name, value in params.items() if value is not None}
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"index parameter {name} must be a positive integer, got {value!r}")
    if kind == "flat":
        return FlatIndex(dim)
    return HNSWIndex(dim, **{name: int(value) for name, value in params.items()})
