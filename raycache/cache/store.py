"""The entry store: cached entries by id, with per-scope membership and the exact-text tier."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from raycache.cache.scope import Scope
from raycache.data import normalize_text


def text_key(prompt: str) -> bytes:
    """128-bit hash of the normalised prompt (``raycache.data.normalize_text``): the exact-tier key."""
    return hashlib.blake2b(normalize_text(prompt).encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


@dataclass
class Entry:
    """One cached (prompt, response). Times are seconds on the cache's clock; ``vector`` is the
    prompt's float32 [dim] embedding; ``expires_at`` None = never."""

    entry_id: int
    prompt: str
    response: str
    scope: Scope
    vector: np.ndarray
    created_at: float
    last_access: float
    expires_at: Optional[float]
    key: bytes


class EntryStore:
    """Entries by id; for each scope its ids and its exact-tier map (text key -> id).

    A scope holds at most one entry per text key: adding a second one replaces the mapping, and the
    caller (the engine) removes the older entry first.
    """

    def __init__(self) -> None:
        self._entries: dict[int, Entry] = {}
        self._scope_ids: dict[Scope, set[int]] = {}
        self._exact: dict[Scope, dict[bytes, int]] = {}

    def add(self, entry: Entry) -> None:
        if entry.entry_id in self._entries:
            raise ValueError(f"entry id {entry.entry_id} is already stored")
        self._entries[entry.entry_id] = entry
        self._scope_ids.setdefault(entry.scope, set()).add(entry.entry_id)
        self._exact.setdefault(entry.scope, {})[entry.key] = entry.entry_id

    def get(self, entry_id: int) -> Optional[Entry]:
        return self._entries.get(int(entry_id))

    def remove(self, entry_id: int) -> Optional[Entry]:
        """Remove and return the entry (None if absent); drops empty scopes."""
        entry = self._entries.pop(int(entry_id), None)
        if entry is None:
            return None
        ids = self._scope_ids[entry.scope]
        ids.discard(entry.entry_id)
        exact = self._exact[entry.scope]
        if exact.get(entry.key) == entry.entry_id:
            del exact[entry.key]
        if not ids:
            del self._scope_ids[entry.scope], self._exact[entry.scope]
        return entry

    def find_exact(self, scope: Scope, key: bytes) -> Optional[Entry]:
        entry_id = self._exact.get(scope, {}).get(key)
        return None if entry_id is None else self._entries[entry_id]

    def scope_size(self, scope: Scope) -> int:
        return len(self._scope_ids.get(scope, ()))

    def scopes(self) -> list[Scope]:
        return list(self._scope_ids)

    def clear(self) -> None:
        self._entries.clear()
        self._scope_ids.clear()
        self._exact.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))
