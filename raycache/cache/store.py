"""The entry store: cached entries by id, with per-scope membership and the exact-text tier."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from raycache.cache.scope import Scope
from raycache.data import normalize_text


def exact_text(prompt: str, casefold: bool = False) -> str:
    """The text the exact tier compares: runs of whitespace collapsed to one space and stripped
    (so "US" and "us", or code differing in case, stay different); ``casefold``: also Unicode NFKC
    and lower case (``raycache.data.normalize_text``), the opt-in ``cache.exact_casefold``."""
    return normalize_text(prompt) if casefold else " ".join(prompt.split())


def text_key(prompt: str, casefold: bool = False) -> bytes:
    """128-bit hash of :func:`exact_text`: the exact-tier key."""
    return hashlib.blake2b(exact_text(prompt, casefold).encode("utf-8", "surrogatepass"),
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
    """Entries by id; for each scope its ids, and for each root scope (namespace + conversation,
    without a long prompt's tail: ``Scope.root``) its exact-tier map (text key -> id).

    A root scope holds at most one entry per text key (the same text has the same tail): adding a
    second one replaces the mapping, and the caller (the engine) removes the older entry first.
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
        self._exact.setdefault(entry.scope.root, {})[entry.key] = entry.entry_id

    def get(self, entry_id: int) -> Optional[Entry]:
        return self._entries.get(int(entry_id))

    def remove(self, entry_id: int) -> Optional[Entry]:
        """Remove and return the entry (None if absent); drops empty scopes."""
        entry = self._entries.pop(int(entry_id), None)
        if entry is None:
            return None
        ids = self._scope_ids[entry.scope]
        ids.discard(entry.entry_id)
        exact = self._exact[entry.scope.root]
        if exact.get(entry.key) == entry.entry_id:
            del exact[entry.key]
        if not exact:
            del self._exact[entry.scope.root]
        if not ids:
            del self._scope_ids[entry.scope]
        return entry

    def find_exact(self, scope: Scope, key: bytes) -> Optional[Entry]:
        """The entry of ``scope``'s root scope whose text key is ``key`` (None if none)."""
        entry_id = self._exact.get(scope.root, {}).get(key)
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
