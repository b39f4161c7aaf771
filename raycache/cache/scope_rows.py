"""Exact search within small scopes: the vectors of entries in conversation (history) and tail
scopes, searched among their own scope's rows only.

Most such scopes hold a handful of entries (one conversation's turns, one long prompt's tail), so a
vector index each would cost far more than its vectors (a FAISS object, an id map, a tombstone set
per history). Here every one of those vectors is a row of one growable float32 matrix, with one row
list per scope; a lookup is one matrix product over its scope's rows, so it can only ever see
entries of its own scope. The engine moves a scope that grows large into an index of its own.
"""

from __future__ import annotations

from typing import Hashable

import numpy as np

MIN_ROWS = 64


class ScopeRows:
    """Vectors [n, dim] float32 of small scopes, rows listed per scope (insertion order), ids int64.

    Removal frees the row (reused by later adds); the matrix is compacted once fewer than a quarter
    of its rows are live, so memory follows the live entries (amortised O(1) per removal).
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self._reset()

    def _reset(self) -> None:
        self._vecs = np.zeros((MIN_ROWS, self.dim), np.float32)
        self._ids = np.full(MIN_ROWS, -1, np.int64)
        self._free: list[int] = list(range(MIN_ROWS - 1, -1, -1))
        self._row: dict[int, int] = {}  # entry id -> row
        self._rows: dict[Hashable, list[int]] = {}  # scope -> its rows, oldest first

    # ------------------------------------------------------------------ changes
    def add(self, scope: Hashable, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``ids`` [n] with ``vectors`` [n, dim] (unit rows) to ``scope``."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(self._free) < len(ids):
            self._extend(max(len(self._row) + len(ids), len(self._ids) * 5 // 4))
        rows = self._rows.setdefault(scope, [])
        for entry_id, vector in zip(ids.tolist(), vectors):
            if entry_id in self._row:
                raise ValueError(f"entry id {entry_id} is already stored")
            row = self._free.pop()
            self._vecs[row], self._ids[row] = vector, entry_id
            self._row[entry_id] = row
            rows.append(row)

    def remove(self, scope: Hashable, entry_id: int) -> bool:
        """Remove ``entry_id`` from ``scope``; True if it was there. A scope left empty is dropped."""
        row = self._row.pop(int(entry_id), None)
        if row is None:
            return False
        rows = self._rows[scope]
        rows.remove(row)
        if not rows:
            del self._rows[scope]
        self._ids[row] = -1
        self._free.append(row)
        if len(self._ids) > MIN_ROWS and len(self._row) < len(self._ids) // 4:
            self._pack(max(MIN_ROWS, 2 * len(self._row)))
        return True

    def pop(self, scope: Hashable) -> tuple[np.ndarray, np.ndarray]:
        """Remove every entry of ``scope``: -> (ids [n] int64, vectors [n, dim]), oldest first."""
        rows = np.asarray(self._rows.get(scope, []), np.int64)
        ids, vectors = self._ids[rows].copy(), self._vecs[rows].copy()
        for entry_id in ids.tolist():
            self.remove(scope, entry_id)
        return ids, vectors

    def clear(self) -> None:
        self._reset()

    def _extend(self, n: int) -> None:
        """Grow to ``n`` rows in place where the allocator can (realloc: no second copy held)."""
        old = len(self._ids)
        self._vecs.resize((n, self.dim), refcheck=False)  # no views of these arrays are handed out
        self._ids.resize(n, refcheck=False)
        self._ids[old:] = -1
        self._free[:0] = range(n - 1, old - 1, -1)  # the new rows, used after the freed ones

    def _pack(self, n: int) -> None:
        """Reallocate to ``n`` rows (n >= live rows), live rows packed first in the same order."""
        live = np.flatnonzero(self._ids >= 0)
        new_row = np.full(len(self._ids), -1, np.int64)
        new_row[live] = np.arange(len(live))
        vecs = np.zeros((n, self.dim), np.float32)
        ids = np.full(n, -1, np.int64)
        vecs[:len(live)], ids[:len(live)] = self._vecs[live], self._ids[live]
        self._vecs, self._ids = vecs, ids
        self._free = list(range(n - 1, len(live) - 1, -1))
        self._row = dict(zip(ids[:len(live)].tolist(), range(len(live))))
        self._rows = {scope: new_row[rows].tolist() for scope, rows in self._rows.items()}

    # ------------------------------------------------------------------ reads
    def search(self, scope: Hashable, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entry of ``scope`` to each query [m, dim] -> (similarities [m] float32, ids [m]
        int64); (-inf, -1) each when the scope is empty. Ties go to the oldest entry."""
        rows = self._rows.get(scope)
        if not rows:
            return np.full(len(queries), -np.inf, np.float32), np.full(len(queries), -1, np.int64)
        sims = np.asarray(queries, np.float32) @ self._vecs[rows].T  # [m, rows]
        best = sims.argmax(axis=1)
        return sims[np.arange(len(sims)), best], self._ids[np.asarray(rows)[best]]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` -> float32 [len(ids), dim] (KeyError for an unknown id)."""
        try:
            rows = [self._row[int(i)] for i in np.asarray(ids).reshape(-1)]
        except KeyError:
            raise KeyError("some ids are not in the scope rows") from None
        return self._vecs[rows]

    def size(self, scope: Hashable) -> int:
        return len(self._rows.get(scope, ()))

    def __contains__(self, scope: Hashable) -> bool:
        return scope in self._rows

    def scopes(self) -> int:
        """How many scopes hold rows."""
        return len(self._rows)

    def __len__(self) -> int:
        return len(self._row)

    @property
    def nbytes(self) -> int:
        """Bytes of the vector and id matrices (Python lists and dicts not counted)."""
        return self._vecs.nbytes + self._ids.nbytes
