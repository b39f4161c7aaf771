"""The entry store: cached entries as columns (numpy arrays + text lists), with per-scope counts and
the exact-text tier."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

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
    """A read-only view of one cached (prompt, response), made on demand (the store keeps columns,
    not these). Times are seconds on the cache's clock; ``expires_at`` None = never; ``vector``: the
    prompt's embedding when the caller has it (the store keeps none: the index holds the vectors)."""

    entry_id: int
    prompt: str
    response: str
    scope: Scope
    vector: Optional[np.ndarray]
    created_at: float
    last_access: float
    expires_at: Optional[float]
    key: bytes


class EntryStoreProtocol(Protocol):
    """What the engine needs from an entry store: columns indexed by slot (the store's row of an
    entry; -1 = none) and the changes and reads below."""

    ids: np.ndarray  # int64 [slots], -1 on free slots
    created_at: np.ndarray  # float64 [slots]
    last_access: np.ndarray  # float64 [slots]
    expires_at: np.ndarray  # float64 [slots], NaN = never
    scope_codes: np.ndarray  # int64 [slots]
    prompts: list
    responses: list

    def add(self, entry_id: int, prompt: str, response: str, scope: Scope, created_at: float,
            expires_at: Optional[float], key: bytes) -> int: ...

    def add_many(self, ids: np.ndarray, prompts: list, responses: list, scope: Scope, keys: list,
                 created_at: np.ndarray, last_access: np.ndarray, expires_at: np.ndarray) -> np.ndarray: ...

    def remove(self, entry_id: int) -> Optional[Scope]: ...

    def touch(self, slot: int, now: float) -> None: ...

    def clear(self) -> None: ...

    def slot(self, entry_id: int) -> int: ...

    def find_exact(self, scope: Scope, key: bytes) -> int: ...

    def scope_of(self, slot: int) -> Scope: ...

    def scope_size(self, scope: Scope) -> int: ...

    def ids_in_namespace(self, namespace: Optional[str]) -> list[int]: ...

    def __len__(self) -> int: ...


def _root_suffix(root: Scope) -> bytes:
    """The bytes of a root scope that follow a text key in :func:`_exact_key`."""
    return root.namespace.encode("utf-8", "surrogatepass") + b"\x00" + root.history_hash.encode("utf-8", "surrogatepass")


def _exact_key(root: Scope, key: bytes, suffix: Optional[bytes] = None) -> bytes:
    """One 128-bit key for (root scope, text key): the exact tier's map needs no tuple per entry.
    ``suffix``: ``_root_suffix(root)``, when the caller has it (one per batch)."""
    return hashlib.blake2b(key + (_root_suffix(root) if suffix is None else suffix), digest_size=16).digest()


class EntryStore:
    """Entries as columns: numpy arrays of ids, times and scope codes, and two lists of texts, one row
    (slot) per entry; free slots are reused. No Python object per entry besides its two texts and
    one dictionary slot each for id -> slot and for the exact tier (root scope + text key -> slot).

    A root scope (namespace + conversation, without a long prompt's tail: ``Scope.root``) holds at
    most one entry per text key: adding a second one replaces the mapping, and the caller (the
    engine) removes the older entry first.
    """

    def __init__(self, initial_slots: int = 1024) -> None:
        self._grow_to(max(16, int(initial_slots)), fresh=True)

    def _grow_to(self, n: int, fresh: bool = False) -> None:
        def grown(old: Optional[np.ndarray], dtype, fill) -> np.ndarray:
            out = np.zeros(n, dtype) if fill is None else np.full(n, fill, dtype)
            if old is not None:
                out[:len(old)] = old
            return out

        get = (lambda name: None) if fresh else (lambda name: getattr(self, name))
        self.ids = grown(get("ids"), np.int64, -1)
        self.created_at = grown(get("created_at"), np.float64, np.nan)
        self.last_access = grown(get("last_access"), np.float64, np.nan)
        self.expires_at = grown(get("expires_at"), np.float64, np.nan)
        self.scope_codes = grown(get("scope_codes"), np.int64, -1)
        self.exact_keys = grown(get("exact_keys"), "V16", None)  # raw 16 bytes (S16 would drop NULs)
        if fresh:
            self.prompts: list[Optional[str]] = [None] * n
            self.responses: list[Optional[str]] = [None] * n
            self._free: list[int] = list(range(n - 1, -1, -1))
            self._slot: dict[int, int] = {}
            self._exact: dict[bytes, int] = {}
            self._scope_code: dict[Scope, int] = {}
            self._scopes: dict[int, Scope] = {}
            self._scope_count: dict[int, int] = {}
            self._next_code = 0
        else:
            old = len(self.prompts)
            self.prompts.extend([None] * (n - old))
            self.responses.extend([None] * (n - old))
            self._free.extend(range(n - 1, old - 1, -1))

    # ------------------------------------------------------------------ changes
    def add(self, entry_id: int, prompt: str, response: str, scope: Scope, created_at: float,
            expires_at: Optional[float], key: bytes) -> int:
        """Store one entry; returns its slot."""
        entry_id = int(entry_id)
        if entry_id in self._slot:
            raise ValueError(f"entry id {entry_id} is already stored")
        if not self._free:
            self._grow_to(2 * len(self.prompts))
        slot = self._free.pop()
        code = self._scope_code.get(scope)
        if code is None:
            code = self._scope_code[scope] = self._next_code
            self._scopes[code] = scope
            self._scope_count[code] = 0
            self._next_code += 1
        self._scope_count[code] += 1
        exact = _exact_key(scope.root, key)
        self.ids[slot], self.scope_codes[slot], self.exact_keys[slot] = entry_id, code, np.void(exact)
        self.created_at[slot] = self.last_access[slot] = created_at
        self.expires_at[slot] = np.nan if expires_at is None else expires_at
        self.prompts[slot], self.responses[slot] = prompt, response
        self._slot[entry_id] = slot
        self._exact[exact] = slot
        return slot

    def add_many(self, ids: np.ndarray, prompts: list, responses: list, scope: Scope, keys: list,
                 created_at: np.ndarray, last_access: np.ndarray, expires_at: np.ndarray) -> np.ndarray:
        """Store n entries of one ``scope`` at once (a restore): the same rows as n ``add`` calls
        followed by ``touch(slot, last_access)``, without the per-entry work on the columns.
        ``ids`` int64 [n], unique and new; ``expires_at`` float64 [n], NaN = never; returns the slots [n]."""
        ids = np.asarray(ids, np.int64)
        n = len(ids)
        if not n:
            return np.zeros(0, np.int64)
        id_list = ids.tolist()
        if len(set(id_list)) != n or not self._slot.keys().isdisjoint(id_list):
            raise ValueError("entry ids must be unique and not already stored")
        if len(self._free) < n:
            self._grow_to(max(2 * len(self.prompts), len(self.prompts) - len(self._free) + n))
        taken = sorted(self._free[-n:])  # the slots n pops would take, ascending
        del self._free[-n:]
        slots = np.asarray(taken, np.int64)
        code = self._scope_code.get(scope)
        if code is None:
            code = self._scope_code[scope] = self._next_code
            self._scopes[code] = scope
            self._scope_count[code] = 0
            self._next_code += 1
        self._scope_count[code] += n
        suffix = _root_suffix(scope.root)
        exact = [_exact_key(scope.root, key, suffix) for key in keys]
        self.ids[slots], self.scope_codes[slots] = ids, code
        self.exact_keys[slots] = np.frombuffer(b"".join(exact), "V16")
        self.created_at[slots], self.last_access[slots] = created_at, last_access
        self.expires_at[slots] = expires_at
        if taken[-1] - taken[0] == n - 1 and np.all(np.diff(slots) == 1):  # fresh store: one run
            self.prompts[taken[0]:taken[0] + n], self.responses[taken[0]:taken[0] + n] = prompts, responses
        else:
            for slot, prompt, response in zip(taken, prompts, responses):
                self.prompts[slot], self.responses[slot] = prompt, response
        self._slot.update(zip(id_list, taken))
        self._exact.update(zip(exact, taken))
        return slots

    def remove(self, entry_id: int) -> Optional[Scope]:
        """Remove the entry; returns its scope (None if absent). Drops scopes left empty."""
        slot = self._slot.pop(int(entry_id), None)
        if slot is None:
            return None
        code = int(self.scope_codes[slot])
        scope = self._scopes[code]
        exact = self.exact_keys[slot].tobytes()
        if self._exact.get(exact) == slot:
            del self._exact[exact]
        self._scope_count[code] -= 1
        if not self._scope_count[code]:
            del self._scope_count[code], self._scopes[code], self._scope_code[scope]
        self.ids[slot], self.scope_codes[slot] = -1, -1
        self.prompts[slot] = self.responses[slot] = None
        self._free.append(slot)
        return scope

    def touch(self, slot: int, now: float) -> None:
        self.last_access[slot] = now

    def clear(self) -> None:
        self._grow_to(16, fresh=True)

    # ------------------------------------------------------------------ reads
    def slot(self, entry_id: int) -> int:
        """The slot of ``entry_id``, -1 if absent."""
        return self._slot.get(int(entry_id), -1)

    def find_exact(self, scope: Scope, key: bytes) -> int:
        """The slot of the entry of ``scope``'s root scope whose text key is ``key`` (-1 if none)."""
        return self._exact.get(_exact_key(scope.root, key), -1)

    def scope_of(self, slot: int) -> Scope:
        return self._scopes[int(self.scope_codes[slot])]

    def scope_size(self, scope: Scope) -> int:
        code = self._scope_code.get(scope)
        return 0 if code is None else self._scope_count[code]

    def ids_in_namespace(self, namespace: Optional[str]) -> list[int]:
        """Ids of every entry (``namespace`` None) or of those of one namespace, any history."""
        if namespace is None:
            return list(self._slot)
        codes = [c for c, scope in self._scopes.items() if scope.namespace == namespace]
        if not codes:
            return []
        return self.ids[np.isin(self.scope_codes, codes)].tolist()

    def get(self, entry_id: int) -> Optional[Entry]:
        slot = self.slot(entry_id)
        return None if slot < 0 else self.view(slot)

    def view(self, slot: int) -> Entry:
        expires = float(self.expires_at[slot])
        return Entry(int(self.ids[slot]), self.prompts[slot], self.responses[slot], self.scope_of(slot),
                     None, float(self.created_at[slot]), float(self.last_access[slot]),
                     None if np.isnan(expires) else expires, self.exact_keys[slot].tobytes())

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, entry_id: object) -> bool:
        return isinstance(entry_id, (int, np.integer)) and int(entry_id) in self._slot

    def __iter__(self) -> Iterator[Entry]:
        return iter([self.view(slot) for slot in list(self._slot.values())])
