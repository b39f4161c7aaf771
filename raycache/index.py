"""Vector indexes over L2-normalised float32 vectors (inner product = cosine), backed by FAISS.

FAISS is used rather than hand-written search: its flat inner-product kernel is BLAS-backed, its
HNSW graph and its inverted lists (IVF) are the standard ANN structures. Every index maps
caller-chosen int64 ids to vectors and supports incremental ``add`` / ``remove``; each removes by
tombstone, filtered at search time and compacted in one pass once tombstones outnumber the live
entries (amortised O(1) per removal).
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


def _drop_returning(index, dead: set[int], ids: np.ndarray) -> None:
    """Before ``ids`` are added again to a FAISS ``index`` that tombstones removals in ``dead``,
    remove the old rows of those that come back, for good."""
    if dead:
        again = [i for i in ids.tolist() if i in dead]
        if again:
            index.remove_ids(np.asarray(again, np.int64))
            dead.difference_update(again)


def _as_vectors(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape [n, {dim}], got {x.shape}")
    return x


def _as_ids(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def _search_live(index, queries: np.ndarray, k: int, dead: set, live: int, partial: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """k nearest live ids of each query from a FAISS ``index`` that may still hold tombstoned
    (``dead``) ids: asks for a few more than ``k`` and looks further for the queries whose results
    were mostly tombstones. Order among equal similarities is FAISS's (insertion order).
    ``partial``: the index searches part of its rows (IVF's probed lists), so a result with missing
    slots means those rows are exhausted and looking further would find nothing more."""
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
            if j < k and kk < total and not (partial and ids[row, -1] < 0):
                short.append(r)  # tombstones hid live entries: look further
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
        _drop_returning(self._index, self._dead, ids)
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

    def live_ids(self) -> np.ndarray:
        """The ids it holds (tombstones left out), in insertion order."""
        external = faiss.vector_to_array(self._index.id_map)
        if not self._dead:
            return external
        return external[~np.isin(external, np.fromiter(self._dead, np.int64, len(self._dead)))]

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


class IVFIndex:
    """Approximate search over inverted lists (FAISS ``IndexIVFFlat``): the vectors are grouped
    around ``nlist`` k-means centroids and a query scans the ``nprobe`` nearest lists only.

    Memory is the vector and its id (no graph: ~1,544 bytes per 384-d entry) and an insert costs
    one assignment to a centroid, so a restore re-adds 1M entries in seconds. The centroids need
    data: until the index holds ``TRAIN_PER_LIST * nlist`` vectors it is an exact :class:`FlatIndex`;
    then it trains on them (k-means, ``KMEANS_ITERATIONS``) and moves them into the lists, once. A
    compaction (tombstones outnumber the live entries) retrains on the live vectors when the index
    has grown ``RETRAIN_GROWTH`` times since its training, so the lists follow a growing cache.
    """

    TRAIN_PER_LIST = 39
    """Training vectors per list (FAISS's recommended minimum)."""
    KMEANS_ITERATIONS = 10
    RETRAIN_GROWTH = 4
    compact_min = 1024
    """Tombstones tolerated before a compaction is considered (its cost ~ the index size)."""

    def __init__(self, dim: int, nlist: int = 1024, nprobe: int = 64):
        self.dim, self.nlist, self.nprobe = dim, nlist, nprobe
        self._flat: "FlatIndex | None" = FlatIndex(dim)  # until trained
        self._ivf = None
        self._dead: set[int] = set()
        self._live = 0
        self.trained_on = 0
        """How many vectors the centroids were trained on (0: not trained, exact search)."""

    @property
    def train_size(self) -> int:
        return self.TRAIN_PER_LIST * self.nlist

    def _train(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """New centroids from (a sample of) ``vectors``; the lists hold ``ids``/``vectors`` only."""
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = self.KMEANS_ITERATIONS
        sample = vectors
        if len(vectors) > self.train_size:  # seeded: the same data trains the same lists
            rows = np.random.default_rng(len(vectors)).choice(len(vectors), self.train_size, replace=False)
            sample = vectors[np.sort(rows)]
        ivf.train(sample)
        ivf.nprobe = self.nprobe
        self._fill(ivf, ids, vectors)
        self._ivf, self._flat, self._dead, self._live = ivf, None, set(), len(ids)
        self.trained_on = len(ids)

    def _fill(self, ivf, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Put ``vectors`` into the empty lists of the trained ``ivf``: each list sized once to
        its count and filled in one copy (``add_with_ids`` grows every list entry by entry,
        which is slower and leaves the heap fragmented: ~30% more resident memory at 1M)."""
        labels = ivf.quantizer.search(vectors, 1)[1][:, 0]
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(self.nlist + 1))
        lists = ivf.invlists
        for number in np.flatnonzero(np.diff(bounds)).tolist():
            rows = order[bounds[number]:bounds[number + 1]]  # small per-list copies: reused memory
            list_ids, codes = np.ascontiguousarray(ids[rows]), np.ascontiguousarray(vectors[rows])
            lists.resize(number, len(rows))
            lists.update_entries(number, 0, len(rows), faiss.swig_ptr(list_ids),
                                 faiss.swig_ptr(codes.view(np.uint8)))
        ivf.ntotal = len(ids)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vecs, ids = _as_vectors(vectors, self.dim), _as_ids(ids)
        if len(ids) != len(vecs):
            raise ValueError(f"{len(ids)} ids for {len(vecs)} vectors")
        if self._flat is not None:
            if not len(self._flat) and len(ids) >= self.train_size:  # a restore: train on it directly
                self._train(ids, vecs)
                return
            self._flat.add(ids, vecs)
            if len(self._flat) >= self.train_size:
                live = self._flat.live_ids()
                self._train(live, self._flat.vectors(live))
            return
        _drop_returning(self._ivf, self._dead, ids)
        self._ivf.add_with_ids(vecs, ids)
        self._live += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        """Tombstone ``ids`` (ids it does not hold are ignored only when no compaction is due)."""
        if self._flat is not None:
            self._flat.remove(ids)
            return
        for i in _as_ids(ids).tolist():
            if i not in self._dead:
                self._dead.add(i)
                self._live -= 1
        if len(self._dead) > max(self.compact_min, self._live):
            self.compact()

    def compact(self) -> None:
        """Drop every tombstone (one pass over the lists); retrain when the index has grown
        ``RETRAIN_GROWTH`` times since its centroids were trained."""
        if self._flat is not None:
            self._flat.compact()
            return
        if self._dead:
            self._ivf.remove_ids(np.fromiter(self._dead, np.int64, len(self._dead)))
            self._dead.clear()
        if self._live >= self.RETRAIN_GROWTH * self.trained_on:
            ids, rows = self._rows()
            self._train(ids, self._gather_rows(rows, np.arange(len(ids))))

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, [list number, offset] per row) of every row of the lists, tombstones included."""
        lists = self._ivf.invlists
        ids, where = [], []
        for number in range(self.nlist):
            size = lists.list_size(number)
            if size:
                ids.append(faiss.rev_swig_ptr(lists.get_ids(number), size).copy())
                where.append(np.stack([np.full(size, number, np.int64), np.arange(size)], axis=1))
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
        return np.concatenate(ids), np.concatenate(where)

    def _gather_rows(self, where: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Vectors [len(order), dim] of rows ``where[order]`` (one read per list)."""
        lists = self._ivf.invlists
        out = np.empty((len(order), self.dim), np.float32)
        picked = where[order]
        by_list = np.argsort(picked[:, 0], kind="stable")
        bounds = np.flatnonzero(np.diff(picked[by_list, 0])) + 1
        for group in np.split(by_list, bounds) if len(by_list) else ():
            number = int(picked[group[0], 0])
            size = lists.list_size(number)
            codes = faiss.rev_swig_ptr(lists.get_codes(number), size * lists.code_size)
            out[group] = codes.view(np.float32).reshape(size, self.dim)[picked[group, 1]]
        return out

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        if self._flat is not None:
            return self._flat.search(queries, k)
        return _search_live(self._ivf, _as_vectors(queries, self.dim), k, self._dead, self._live, partial=True)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (live ids only), float32 [len(ids), dim]."""
        ids = _as_ids(ids)
        if self._flat is not None:
            return self._flat.vectors(ids)
        if self._dead and np.isin(ids, np.fromiter(self._dead, np.int64, len(self._dead))).any():
            raise KeyError("some ids are not in the index")
        external, where = self._rows()
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        sorter = np.argsort(external, kind="stable")
        at = np.minimum(np.searchsorted(external, ids, sorter=sorter), max(len(external) - 1, 0))
        if not len(external) or not np.array_equal(external[sorter[at]], ids):
            raise KeyError("some ids are not in the index")
        return self._gather_rows(where, sorter[at])

    def __len__(self) -> int:
        return len(self._flat) if self._flat is not None else max(self._live, 0)


INDEX_PARAMS = {"flat": (), "hnsw": ("m", "ef_construction", "ef_search"), "ivf": ("nlist", "nprobe")}
"""The parameters ``make_index`` takes per index kind (``cache.<kind>_<name>`` in the config)."""


def make_index(kind: str, dim: int, **params: int) -> VectorIndex:
    """'flat' (exact, default), 'hnsw' or 'ivf' (approximate, for large caches).

    ``params`` (None = the default), each a positive integer: hnsw ``m`` graph degree,
    ``ef_construction`` build breadth, ``ef_search`` search breadth; ivf ``nlist`` lists,
    ``nprobe`` lists scanned per query (recall vs latency).
    """
    if kind not in INDEX_PARAMS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {list(INDEX_PARAMS)}")
    params = {name: value for name, value in params.items() if value is not None}
    unknown = sorted(set(params) - set(INDEX_PARAMS[kind]))
    if unknown:
        raise ValueError(f"unknown index parameter(s) {unknown} for {kind!r}; "
                         f"expected some of {list(INDEX_PARAMS[kind])}")
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"index parameter {name} must be a positive integer, got {value!r}")
    if kind == "flat":
        return FlatIndex(dim)
    params = {name: int(value) for name, value in params.items()}
    return HNSWIndex(dim, **params) if kind == "hnsw" else IVFIndex(dim, **params)
