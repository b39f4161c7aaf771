"""SemanticCache: ``check(prompt)`` -> hit or miss, ``store(prompt, response)``.

The engine composes swappable parts and needs no Ray:

* an encoder (anything with ``encode(list[str]) -> float32 [n, dim]``; None when callers always pass
  vectors),
* one vector index per namespace for its entries without history (``raycache.index``: exact
  ``flat`` by default, ``hnsw`` or ``ivf`` for large caches); entries of conversation (history) and tail scopes
  are searched exactly among their own scope's rows (:class:`raycache.cache.scope_rows.ScopeRows`,
  no index per history) until the scope reaches ``scope_index_min`` entries (a system prompt shared
  by every chat, say), when it gets an index of its own; either way a lookup only ever sees entries
  of its own scope,
* the entry store with the exact tier (whitespace-normalised text hash per scope, answered without
  encoding; case folding opt-in), whose hits the decision policy still decides (at similarity 1),
* LRU capacity + per-entry TTL eviction, and a decision policy (static or calibrated threshold).

Prompts longer than the encoder's window: the encoder reports the text it did not embed (its
``unembedded_tails``), and such a prompt is searched and stored in a sub-scope keyed by that tail
(``Scope.with_tail``), so a semantic hit is only ever served when everything beyond the window is
identical; the embedded part alone never decides.

Entry ids are fresh, monotonically increasing int64s (never reused, as the indexes remove by
tombstone), unique across restarts and caches: a new cache starts its ids at a random 20-bit prefix
times 2**32 (:func:`fresh_id_base`; every id stays below 2**53, exact in JSON), and a restored one
continues its snapshot's sequence.

Entries are held as columns (:class:`raycache.cache.store.EntryStore`: numpy arrays and two text
lists, no object per entry) and each vector once, in its scope's index (snapshots read it back).
Lookups split in two (``begin_lookup`` / ``complete_lookup``) so an async caller can compute the
vectors elsewhere (the Serve embedder) without holding the cache lock; ``check_batch`` runs both
halves with the local encoder.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from raycache.cache.decision import EXACT_SIMILARITY, decide, exact_hit
from raycache.cache.eviction import Eviction, LRUEviction
from raycache.cache.journal import Changes, Journal
from raycache.cache.persist import Snapshot, SnapshotError, write_snapshot
from raycache.cache.policy import CalibratedThreshold, DecisionPolicy, StaticThreshold
from raycache.cache.scope import Scope, make_scope, tail_key
from raycache.cache.segments import read_persisted
from raycache.cache.scope_rows import ScopeRows
from raycache.cache.store import EntryStore, EntryStoreProtocol, text_key
from raycache.config import CacheConfig, ConfigError
from raycache.index import INDEX_PARAMS, VectorIndex, make_index
from raycache.numeric import percentiles, unit_rows

logger = logging.getLogger(__name__)

LATENCY_WINDOW = 10_000  # lookups kept for the latency percentiles
ID_PREFIX_BITS = 20  # random prefix of a new cache's entry ids (ids < 2**(20 + 32) + 2**32 < 2**53)


def fresh_id_base() -> int:
    """The first entry id of a new cache: a random prefix in the high bits, so caches started
    independently (restarts without a snapshot, shards) do not hand out the same ids."""
    return ((secrets.randbits(ID_PREFIX_BITS) + 1) << 32) + 1

IndexFactory = Callable[[int], VectorIndex]
Histories = Optional[Sequence[Optional[Sequence[Any]]]]


@dataclass
class LookupResult:
    """Outcome of one lookup. ``similarity``: cosine to the nearest entry of the scope (1.0 for an
    exact-tier match, which the policy decides like any other; on a miss the best similarity seen,
    None when the scope was empty)."""

    hit: bool
    response: Optional[str]
    similarity: Optional[float]
    matched_prompt: Optional[str]
    entry_id: Optional[int]
    exact: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


MISS = LookupResult(hit=False, response=None, similarity=None, matched_prompt=None, entry_id=None)


@dataclass
class PendingLookup:
    """First half of a batch lookup: exact-tier and empty-scope answers are final; the prompts at
    positions ``need`` still need vectors (``texts``, in that order)."""

    prompts: list[str]
    scopes: list[Scope]
    results: list[Optional[LookupResult]]
    need: list[int]
    started: float = field(default_factory=time.perf_counter)

    @property
    def texts(self) -> list[str]:
        return [self.prompts[i] for i in self.need]


def _check_prompts(prompts: Sequence[str], what: str = "prompt") -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"expected a list of {what}s, got one string")
    out = list(prompts)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise TypeError(f"{what} {i} must be a string, got {type(p).__name__}")
        if what == "prompt" and not p.strip():
            raise ValueError(f"prompt {i} is empty")
    return out


def _per_item(value: Any, n: int, name: str, scalar_types: tuple) -> list:
    if value is None or isinstance(value, scalar_types):
        return [value] * n
    out = list(value)
    if len(out) != n:
        raise ValueError(f"{len(out)} {name} for {n} prompts")
    return out


def _unit_vectors(vectors: Any, n: int, dim: int) -> np.ndarray:
    """Validate [n, dim] (a single [dim] vector when n == 1) and L2-normalise rows."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1 and n == 1:
        x = x[None, :]
    if x.shape != (n, dim):
        raise ValueError(f"expected vectors of shape ({n}, {dim}), got {x.shape}")
    return unit_rows(x)


def _tails_of(result: Any, n: int) -> tuple[Any, list[str]]:
    """(vectors, tail keys) from an embedder's answer: an array, or (array, tail keys)."""
    if isinstance(result, tuple):
        vectors, tails = result
        tails = ["" if t is None else str(t) for t in tails]
        if len(tails) != n:
            raise ValueError(f"{len(tails)} tail keys for {n} prompts")
        return vectors, tails
    return result, [""] * n


def _percentiles(samples: Sequence[float]) -> dict:
    if not samples:
        return {"p50": None, "p95": None, "p99": None, "count": 0}
    return {**{k: round(v, 3) for k, v in percentiles(samples).items()}, "count": len(samples)}


class SemanticCache:
    """Semantic prompt cache over one index per namespace. Thread-safe (one re-entrant lock).

    ``index``: 'flat' | 'hnsw' | 'ivf' or a factory ``dim -> VectorIndex``; ``index_params``: that
    kind's parameters of ``make_index`` (hnsw ``m``, ``ef_construction``, ``ef_search``; ivf
    ``nlist``, ``nprobe``); ``scope_index_min``:
    entries at which a history or tail scope gets an index of its own (smaller ones are searched
    exactly among their rows); ``clock``: seconds (TTL and timestamps; inject a fake one in tests);
    ``model_tag``: which encoder produced the vectors (stored in snapshots; restoring one from
    another encoder is refused).
    """

    def __init__(self, encoder: Any, dim: int, index: Union[str, IndexFactory] = "flat",
                 store: Optional[EntryStoreProtocol] = None, eviction: Optional[Eviction] = None,
                 policy: Optional[DecisionPolicy] = None, exact_tier: bool = True,
                 clock: Callable[[], float] = time.time, model_tag: Optional[str] = None,
                 exact_casefold: bool = False, index_params: Optional[dict] = None,
                 scope_index_min: int = 1024):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if (isinstance(scope_index_min, bool) or not isinstance(scope_index_min, (int, np.integer))
                or scope_index_min < 2):
            raise ValueError(f"scope_index_min must be an integer >= 2, got {scope_index_min!r}")
        self.encoder = encoder
        self.dim = int(dim)
        params = dict(index_params or {})
        if isinstance(index, str):
            self.index_kind = index
            make_index(index, 1, **params)  # validates kind and parameters now, not at the first insert
            self._new_index: IndexFactory = lambda d, kind=index: make_index(kind, d, **params)
        else:
            if params:
                raise ValueError("index_params apply to a named index kind, not to an index factory")
            self.index_kind, self._new_index = getattr(index, "__name__", "custom"), index
        self.scope_index_min = int(scope_index_min)
        self.entries = store if store is not None else EntryStore()
        self.eviction = eviction if eviction is not None else LRUEviction()
        self.policy = policy if policy is not None else StaticThreshold(0.9)
        self.exact_tier = exact_tier
        self.exact_casefold = bool(exact_casefold)
        self.clock = clock
        self.model_tag = model_tag
        self.version = 0  # bumped on every change (the periodic snapshot saves when it moved)
        self._indexes: dict[Scope, VectorIndex] = {}  # Scope(namespace) + the scopes grown large
        self._rows = ScopeRows(self.dim)  # every other scope's vectors
        self._roots: dict[Scope, int] = {}  # root scope -> how many of its (tail) scopes hold entries
        self._next_id = fresh_id_base()
        self._lock = threading.RLock()
        self._counts = dict.fromkeys(("lookups", "hits", "exact_hits", "misses", "stores",
                                      "replaced", "evictions", "expirations"), 0)
        self._latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._journal: Optional[Journal] = None  # changes since the last flush, while a log is attached

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: CacheConfig, encoder: Any = None, dim: Optional[int] = None,
                    policy: Optional[DecisionPolicy] = None, model_tag: Optional[str] = None,
                    clock: Callable[[], float] = time.time) -> "SemanticCache":
        """Build from a :class:`CacheConfig` (persistence is the caller's: see ``save``/``restore``).

        ``dim`` defaults to ``encoder.dim``; ``policy`` overrides the configured one (the calibrated
        policy is fitted here on ``cfg.calibration_pairs`` with ``encoder`` otherwise).
        """
        if dim is None:
            if encoder is None:
                raise ValueError("from_config needs an encoder or an explicit dim")
            dim = int(getattr(encoder, "dim", None) or np.asarray(encoder.encode(["dim"])).shape[1])
        if policy is None:
            policy = policy_from_config(cfg, encoder)
        index_params = {name: getattr(cfg, f"{cfg.index}_{name}") for name in INDEX_PARAMS[cfg.index]} or None
        return cls(encoder, dim, index=cfg.index, eviction=LRUEviction(cfg.capacity, cfg.ttl_s),
                   policy=policy, exact_tier=cfg.exact_tier, exact_casefold=cfg.exact_casefold,
                   clock=clock, index_params=index_params, scope_index_min=cfg.scope_index_min,
                   model_tag=model_tag if model_tag is not None else getattr(encoder, "source", None))

    # ------------------------------------------------------------------ lookups
    def check(self, prompt: str, namespace: str = "default", history: Optional[Sequence[Any]] = None,
              vector: Optional[np.ndarray] = None) -> LookupResult:
        """Look one prompt up in its scope (namespace + history)."""
        return self.check_batch([prompt], namespace, None if history is None else [history],
                                None if vector is None else np.asarray(vector).reshape(1, -1))[0]

    def check_batch(self, prompts: Sequence[str], namespaces: Union[str, Sequence[str]] = "default",
                    histories: Histories = None, vectors: Optional[np.ndarray] = None) -> list[LookupResult]:
        """Look prompts up; ``vectors`` [n, dim] skips encoding (else the encoder embeds only the
        prompts the exact tier did not answer). ``histories``: None or one per prompt."""
        pending = self.begin_lookup(prompts, namespaces, histories)
        if vectors is not None:
            vecs = _unit_vectors(vectors, len(pending.prompts), self.dim)[pending.need]
            tails = self._tails(pending.texts)
        else:
            vecs, tails = self._encode(pending.texts)
        return self.complete_lookup(pending, vecs, tails)

    def begin_lookup(self, prompts: Sequence[str], namespaces: Union[str, Sequence[str]] = "default",
                     histories: Histories = None) -> PendingLookup:
        """Answer what needs no vector (exact repeats, empty scopes); say which prompts need one."""
        prompts = _check_prompts(prompts)
        n = len(prompts)
        scopes = [make_scope(ns, h) for ns, h in zip(_per_item(namespaces, n, "namespaces", (str,)),
                                                     _per_item(histories, n, "histories", ()))]
        keys = [text_key(p, self.exact_casefold) for p in prompts] if self.exact_tier else [None] * n
        pending = PendingLookup(prompts, scopes, [None] * n, [])
        with self._lock:
            now = self.clock()
            self._purge_expired(now)
            for i, (scope, key) in enumerate(zip(scopes, keys)):
                slot = self.entries.find_exact(scope, key) if key is not None else -1
                if slot >= 0:  # the same text: similarity 1, which the policy still decides
                    if exact_hit(self.policy):
                        entry_id = self._touch(slot, now)
                        pending.results[i] = LookupResult(True, self.entries.responses[slot],
                                                          EXACT_SIMILARITY, self.entries.prompts[slot],
                                                          entry_id, exact=True)
                    else:
                        pending.results[i] = LookupResult(False, None, EXACT_SIMILARITY, None, None)
                elif scope not in self._roots:
                    pending.results[i] = MISS
                else:
                    pending.need.append(i)
        return pending

    def complete_lookup(self, pending: PendingLookup, vectors: Any,
                        tails: Optional[Sequence[str]] = None) -> list[LookupResult]:
        """Search the scope indexes with the vectors of ``pending.texts`` ([len(need), dim]) and
        decide with the policy; records stats. ``tails``: the tail key of each text beyond the
        encoder's window ("" = embedded whole; :func:`raycache.cache.scope.tail_key`), or
        ``vectors`` as an embedder's ``(vectors, tails)``; None = the local encoder's, if any."""
        results = list(pending.results)
        if isinstance(vectors, tuple):
            vectors, tails = _tails_of(vectors, len(pending.need))
        elif tails is None:
            tails = self._tails(pending.texts)
        if len(tails) != len(pending.need):
            raise ValueError(f"{len(tails)} tail keys for {len(pending.need)} prompts")
        if pending.need:
            vecs = _unit_vectors(vectors, len(pending.need), self.dim)
        with self._lock:
            now = self.clock()
            self._purge_expired(now)
            by_scope: dict[Scope, list[int]] = {}
            for row, i in enumerate(pending.need):
                by_scope.setdefault(pending.scopes[i].with_tail(tails[row]), []).append(row)
            for scope, rows in by_scope.items():
                sims, ids = self._search(scope, vecs[rows])
                for row, sim, entry_id in zip(rows, sims, ids):  # an emptied scope: id -1, a miss
                    results[pending.need[row]] = self._decide(float(sim), int(entry_id), now)
            hits = sum(r.hit for r in results)
            self._counts["lookups"] += len(results)
            self._counts["hits"] += hits
            self._counts["exact_hits"] += sum(r.exact for r in results)
            self._counts["misses"] += len(results) - hits
            if results:
                self._latency_ms.append((time.perf_counter() - pending.started) * 1000.0)
        return results

    def _decide(self, similarity: float, entry_id: int, now: float) -> LookupResult:
        """The policy's verdict on the nearest entry (``raycache.cache.decision``: the one rule)."""
        slot = self.entries.slot(entry_id) if entry_id >= 0 else -1
        verdict = decide(self.policy, similarity) if slot >= 0 else None
        if verdict is None:
            return MISS
        if not verdict:
            return LookupResult(False, None, similarity, None, None)
        self._touch(slot, now)
        return LookupResult(True, self.entries.responses[slot], similarity, self.entries.prompts[slot],
                            entry_id)

    def _touch(self, slot: int, now: float) -> int:
        """Mark the entry in ``slot`` used now; returns its id."""
        entry_id = int(self.entries.ids[slot])
        self.entries.touch(slot, now)
        self.eviction.touch(entry_id)
        if self._journal is not None:
            self._journal.used(entry_id)
        return entry_id

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(vectors [n, dim], tail keys) of ``texts`` with the local encoder: what ``store`` and
        ``complete_lookup`` take from an outside embedder."""
        return self._encode(_check_prompts(texts))

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[str]]:
        """(vectors, tail keys) of ``texts`` with the local encoder."""
        if not texts:
            return np.zeros((0, self.dim), np.float32), []
        if self.encoder is None:
            raise ValueError("this cache has no encoder: pass vectors to check/store")
        return np.asarray(self.encoder.encode(texts), dtype=np.float32), self._tails(texts)

    def _tails(self, texts: Sequence[str]) -> list[str]:
        """Tail keys of the text the local encoder would not embed ("" each when the encoder has
        no window, or there is no local encoder: then the caller passes them)."""
        split = getattr(self.encoder, "unembedded_tails", None)
        if split is None or not texts:
            return [""] * len(texts)
        return [tail_key(t) for t in split(list(texts))]

    # ------------------------------------------------------------------ inserts
    def store(self, prompt: str, response: str, namespace: str = "default",
              history: Optional[Sequence[Any]] = None, ttl_s: Optional[float] = None,
              vector: Optional[np.ndarray] = None, tail: Optional[str] = None) -> int:
        """Cache ``response`` for ``prompt`` in its scope; returns the new entry id.

        An entry with the same normalised prompt in the same scope is replaced. ``ttl_s`` overrides
        the default time to live (seconds). May evict least recently used entries. ``tail``: the
        key of the prompt's text beyond the encoder's window (None: the local encoder's).
        """
        return self.store_batch([prompt], [response], namespace,
                                None if history is None else [history], ttl_s,
                                None if vector is None else np.asarray(vector).reshape(1, -1),
                                None if tail is None else [tail])[0]

    def store_batch(self, prompts: Sequence[str], responses: Sequence[str],
                    namespaces: Union[str, Sequence[str]] = "default", histories: Histories = None,
                    ttl_s: Optional[float] = None, vectors: Optional[np.ndarray] = None,
                    tails: Optional[Sequence[str]] = None) -> list[int]:
        """``store`` for many prompts (one encoder call); returns entry ids in input order.
        ``tails``: tail keys beyond the encoder's window (None: the local encoder's)."""
        prompts, responses = _check_prompts(prompts), _check_prompts(responses, "response")
        n = len(prompts)
        if len(responses) != n:
            raise ValueError(f"{len(responses)} responses for {n} prompts")
        scopes = [make_scope(ns, h) for ns, h in zip(_per_item(namespaces, n, "namespaces", (str,)),
                                                     _per_item(histories, n, "histories", ()))]
        keys = [text_key(p, self.exact_casefold) for p in prompts]
        if vectors is None:
            vectors, local_tails = self._encode(prompts)
            tails = local_tails if tails is None else tails
        elif tails is None:
            tails = self._tails(prompts)
        tails = list(tails)
        if len(tails) != n:
            raise ValueError(f"{len(tails)} tail keys for {n} prompts")
        scopes = [scope.with_tail(tail) for scope, tail in zip(scopes, tails)]
        vecs = _unit_vectors(vectors, n, self.dim)
        ids = []
        with self._lock:
            now = self.clock()
            expires_at = self.eviction.expires_at(now, ttl_s)
            self._purge_expired(now)
            for row, (prompt, response, scope, key) in enumerate(zip(prompts, responses, scopes, keys)):
                previous = self.entries.find_exact(scope, key)
                if previous >= 0 and self._drop(int(self.entries.ids[previous])):
                    self._counts["replaced"] += 1
                entry_id = self._next_id
                self._next_id += 1
                self._insert(entry_id, prompt, response, scope, key, now, expires_at)
                if self._journal is not None:
                    self._journal.stored(entry_id, vecs[row])
                self._add_vectors(scope, np.array([entry_id], np.int64), vecs[row:row + 1])
                ids.append(entry_id)
                for victim in self.eviction.pop_over_capacity():
                    if self._drop(victim):
                        self._counts["evictions"] += 1
            self._counts["stores"] += n
            self.version += 1
        return ids

    def _insert(self, entry_id: int, prompt: str, response: str, scope: Scope, key: bytes,
                created_at: float, expires_at: Optional[float], last_access: Optional[float] = None) -> None:
        """Add an entry to the store and the eviction order (its vector goes to the scope's index
        separately: one copy, held by the index)."""
        slot = self.entries.add(entry_id, prompt, response, scope, created_at, expires_at, key)
        if last_access is not None:
            self.entries.touch(slot, last_access)
        self.eviction.admit(entry_id, expires_at)

    # ------------------------------------------------------------------ vectors
    def _add_vectors(self, scope: Scope, ids: np.ndarray, vectors: np.ndarray) -> None:
        """File the vectors [n, dim] of entries ``ids`` of ``scope``: in the namespace's index (no
        history), the scope's own index (grown large), or the scope rows, moving the scope's rows
        into an index of its own once it reaches ``scope_index_min`` entries."""
        index = self._indexes.get(scope)
        if index is None:
            held = self._rows.size(scope)
            if not held:
                root = scope.root
                self._roots[root] = self._roots.get(root, 0) + 1
            if scope.history_hash and held + len(ids) < self.scope_index_min:
                self._rows.add(scope, ids, vectors)
                return
            index = self._indexes[scope] = self._new_index(self.dim)
            if held:
                index.add(*self._rows.pop(scope))
        index.add(ids, vectors)

    def _search(self, scope: Scope, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entry of ``scope`` to each query [m, dim] -> (similarities [m], ids [m]);
        (-inf, -1) where the scope is empty."""
        index = self._indexes.get(scope)
        if index is None:
            return self._rows.search(scope, queries)
        sims, ids = index.search(queries, 1)
        return sims[:, 0], ids[:, 0]

    def _scope_vectors(self, scope: Scope, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of entries ``ids`` of ``scope`` -> float32 [len(ids), dim]."""
        index = self._indexes.get(scope)
        return self._rows.vectors(ids) if index is None else index.vectors(ids)

    def _clear_vectors(self) -> None:
        self._indexes.clear()
        self._rows.clear()
        self._roots.clear()

    # ------------------------------------------------------------------ removal
    def _drop(self, entry_id: int) -> bool:
        scope = self.entries.remove(entry_id)
        if scope is None:
            return False
        self.eviction.forget(entry_id)
        if self._journal is not None:
            self._journal.dropped(entry_id)
        index = self._indexes.get(scope)
        if not self.entries.scope_size(scope):
            if index is None:
                self._rows.remove(scope, entry_id)
            else:
                del self._indexes[scope]
            root = scope.root
            self._roots[root] -= 1
            if not self._roots[root]:
                del self._roots[root]
        elif index is None:
            self._rows.remove(scope, entry_id)
        else:
            index.remove(np.array([entry_id], np.int64))
        self.version += 1
        return True

    def _purge_expired(self, now: float) -> None:
        for entry_id in self.eviction.pop_expired(now):
            if self._drop(entry_id):
                self._counts["expirations"] += 1

    def clear(self, namespace: Optional[str] = None) -> int:
        """Remove every entry (or those of one namespace, any history); returns how many."""
        with self._lock:
            doomed = self.entries.ids_in_namespace(namespace)
            for entry_id in doomed:
                self._drop(entry_id)
            return len(doomed)

    # ------------------------------------------------------------------ introspection
    def __len__(self) -> int:
        with self._lock:
            self._purge_expired(self.clock())
            return len(self.entries)

    def gauges(self) -> dict:
        """The cheap part of ``stats`` (entries, scopes, eviction and expiration counts), for
        metrics updated on every request."""
        with self._lock:
            self._purge_expired(self.clock())
            return {"entries": len(self.entries), "scopes": len(self._indexes) + self._rows.scopes(),
                    "evictions": self._counts["evictions"], "expirations": self._counts["expirations"]}

    def stats(self) -> dict:
        """Counters since start, sizes, the policy, and lookup latency percentiles (ms, the last
        ``LATENCY_WINDOW`` lookup calls; a batch counts once). JSON-serialisable."""
        with self._lock:
            self._purge_expired(self.clock())
            c = dict(self._counts)
            return {
                "entries": len(self.entries), "scopes": len(self._indexes) + self._rows.scopes(),
                "scope_indexes": len(self._indexes), **c,
                "semantic_hits": c["hits"] - c["exact_hits"],
                "hit_rate": c["hits"] / c["lookups"] if c["lookups"] else None,
                "capacity": self.eviction.capacity, "default_ttl_s": self.eviction.default_ttl_s,
                "index": self.index_kind, "exact_tier": self.exact_tier,
                "exact_match": "case-folded" if self.exact_casefold else "whitespace-normalised",
                "embed_window_tokens": getattr(self.encoder, "max_length", None),
                "policy": self.policy.describe(), "lookup_ms": _percentiles(self._latency_ms),
            }

    # ------------------------------------------------------------------ persistence
    def snapshot(self) -> Snapshot:
        """A consistent copy of every entry, least recently used first."""
        with self._lock:
            self._purge_expired(self.clock())
            store = self.entries
            order = self.eviction.order()
            slots = np.fromiter((store.slot(i) for i in order), np.int64, len(order))
            ids = store.ids[slots]
            codes = store.scope_codes[slots]
            vectors = np.empty((len(slots), self.dim), np.float32)
            by_code = np.argsort(codes, kind="stable")  # rows grouped by scope: one read per index
            bounds = np.flatnonzero(np.diff(codes[by_code])) + 1
            for rows in np.split(by_code, bounds) if len(by_code) else ():
                scope = store.scope_of(int(slots[rows[0]]))
                vectors[rows] = self._scope_vectors(scope, ids[rows])
            scopes = [store.scope_of(int(slot)) for slot in slots]
            return Snapshot(
                ids=ids.copy(), vectors=vectors,
                created_at=store.created_at[slots].copy(),
                last_access=store.last_access[slots].copy(),
                expires_at=store.expires_at[slots].copy(),
                prompts=[store.prompts[slot] for slot in slots.tolist()],
                responses=[store.responses[slot] for slot in slots.tolist()],
                namespaces=[scope.namespace for scope in scopes],
                history_hashes=[scope.history_hash for scope in scopes],
                meta=self._snapshot_meta(),
            )

    def _snapshot_meta(self) -> dict:
        return {"dim": self.dim, "next_id": self._next_id, "model": self.model_tag, "saved_at": self.clock()}

    def start_journal(self) -> None:
        """Record every change from now on for :meth:`take_changes` (a segment log's flushes); a
        cache that already holds entries hands them all over at the first take."""
        with self._lock:
            if self._journal is None:
                self._journal = Journal(full=len(self.entries) > 0)

    def take_changes(self, full: bool = False) -> Changes:
        """The changes since the previous take, O(changes) under the lock (never O(entries)); with
        ``full``, or after a restore from elsewhere, the whole cache (``snapshot()``). RuntimeError
        unless :meth:`start_journal` was called."""
        with self._lock:
            if self._journal is None:
                raise RuntimeError("take_changes needs start_journal() first")
            self._purge_expired(self.clock())
            journal, self._journal = self._journal, Journal()
            if full or journal.full:
                return Changes(self.snapshot(), full=True)
            store = self.entries
            order = np.fromiter(journal.order, np.int64, len(journal.order))
            slots = np.fromiter((store.slot(i) for i in journal.order), np.int64, len(order))
            stored = np.fromiter((i in journal.vectors for i in journal.order), bool, len(order))
            new = slots[stored].tolist()
            scopes = [store.scope_of(slot) for slot in new]
            last_access = store.last_access[slots]
            entries = Snapshot(
                ids=order[stored], vectors=np.zeros((0, self.dim), np.float32),
                created_at=store.created_at[new], last_access=last_access[stored],
                expires_at=store.expires_at[new], prompts=[store.prompts[slot] for slot in new],
                responses=[store.responses[slot] for slot in new],
                namespaces=[scope.namespace for scope in scopes],
                history_hashes=[scope.history_hash for scope in scopes], meta=self._snapshot_meta())
        if len(entries):  # the taken journal is ours alone now: stack its vectors outside the lock
            entries.vectors = np.stack([journal.vectors[i] for i in entries.ids.tolist()])
        return Changes(entries, order, last_access, np.asarray(journal.removed, np.int64), stored)

    def restore_snapshot(self, snap: Snapshot, in_log: bool = False) -> int:
        """Replace the contents with ``snap``'s (expired entries dropped, capacity enforced);
        returns the number of entries kept. SnapshotError if it belongs to another encoder.
        ``in_log``: ``snap`` is what the attached segment log holds, so the next ``take_changes``
        needs only the drops made here (else, while journaling, it is the whole cache)."""
        if snap.meta.get("dim") != self.dim:
            raise SnapshotError(f"snapshot vectors have dim {snap.meta.get('dim')}, this cache {self.dim} "
                                f"(saved with another encoder?)")
        saved_model = snap.meta.get("model")
        if saved_model is not None and self.model_tag is not None and saved_model != self.model_tag:
            raise SnapshotError(f"snapshot was made with encoder {saved_model!r}, this cache uses "
                                f"{self.model_tag!r}; its vectors are not comparable")
        if len(np.unique(snap.ids)) != len(snap.ids) or (len(snap.ids) and snap.ids.min() < 1):
            raise SnapshotError("snapshot entry ids must be unique positive integers")
        try:
            vectors = _unit_vectors(snap.vectors, len(snap), self.dim) if len(snap) else snap.vectors
        except ValueError as exc:
            raise SnapshotError(f"snapshot vectors are invalid: {exc}") from None
        with self._lock:
            self.entries.clear()
            self.eviction.clear()
            self._clear_vectors()
            if self._journal is not None:
                self._journal = Journal(full=not in_log)
            codes: dict[tuple[str, str], int] = {}  # (namespace, history hash) -> scope number
            code_of = [codes.setdefault(pair, len(codes)) for pair in zip(snap.namespaces, snap.history_hashes)]
            distinct = [Scope(ns, h) for ns, h in codes]  # one Scope object per scope, not per entry
            root_codes: dict[Scope, int] = {}
            root_of = [root_codes.setdefault(scope.root, len(root_codes)) for scope in distinct]
            keys = [text_key(prompt, self.exact_casefold) for prompt in snap.prompts]
            newest = {}  # a newer duplicate wins (lists are oldest first)
            for i, (code, key) in enumerate(zip(code_of, keys)):
                newest[(root_of[code], key)] = i
            kept = np.asarray(sorted(newest.values()), np.int64)  # oldest first
            everything = len(kept) == len(snap) and len(distinct) == 1  # the common case: no copies
            kept_codes = np.asarray(code_of, np.int64)[kept]
            for code in dict.fromkeys(kept_codes.tolist()):  # per scope: one batched store and index add
                rows = kept if everything else kept[kept_codes == code]
                picks = rows.tolist()
                self.entries.add_many(
                    snap.ids[rows], snap.prompts if everything else [snap.prompts[i] for i in picks],
                    snap.responses if everything else [snap.responses[i] for i in picks], distinct[code],
                    keys if everything else [keys[i] for i in picks], snap.created_at[rows],
                    snap.last_access[rows], snap.expires_at[rows])
                self._add_vectors(distinct[code], snap.ids[rows].astype(np.int64),
                                  vectors if everything else vectors[rows])
            expires_at = snap.expires_at.tolist()
            for i, entry_id in zip(kept.tolist(), snap.ids[kept].tolist()):  # recency: oldest first
                expires = expires_at[i]
                self.eviction.admit(entry_id, None if math.isnan(expires) else expires)
            self._next_id = max(int(snap.meta.get("next_id", 1)), int(snap.ids.max(initial=0)) + 1)
            self._purge_expired(self.clock())
            for victim in self.eviction.pop_over_capacity():
                if self._drop(victim):
                    self._counts["evictions"] += 1
            self.version += 1
            return len(self.entries)

    def save(self, path: Union[str, Path]) -> Path:
        """Write a snapshot atomically to ``path``."""
        return write_snapshot(path, self.snapshot())

    def restore(self, path: Union[str, Path]) -> int:
        """Load ``path`` (a snapshot file or a local segment log folder) into this cache
        (FileNotFoundError if absent, SnapshotError if bad)."""
        return self.restore_snapshot(read_persisted(path))

    @classmethod
    def load(cls, path: Union[str, Path], encoder: Any = None, **kwargs: Any) -> "SemanticCache":
        """A new cache (``kwargs`` as for ``__init__``, dim from the file) holding the snapshot."""
        snap = read_persisted(path)
        cache = cls(encoder, snap.meta["dim"], **kwargs)
        cache.restore_snapshot(snap)
        return cache


# ---------------------------------------------------------------------------- policies from config
class PrecomputedEncoder:
    """An encoder over vectors computed elsewhere (``texts[i]`` -> ``vectors[i]``, float32
    [n, dim]), with the model ``source`` they came from: lets :func:`policy_from_config` run where
    embedding is remote (the Serve replica embeds through the Embedder first). KeyError for a text
    it was not given."""

    def __init__(self, texts: Sequence[str], vectors: Optional[np.ndarray], source: Optional[str] = None):
        self.source = source
        self._rows = {text: i for i, text in enumerate(texts)}
        self._vectors = np.zeros((0, 0), np.float32) if vectors is None else np.asarray(vectors, np.float32)
        if len(self._vectors) != len(self._rows):
            raise ValueError(f"{len(self._vectors)} vectors for {len(self._rows)} distinct texts")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._vectors[[self._rows[text] for text in texts]]


def row_cosines(vectors_a: np.ndarray, vectors_b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair of two [n, dim] arrays -> float64 [n]."""
    a = _unit_vectors(vectors_a, len(vectors_a), np.shape(vectors_a)[-1])
    b = _unit_vectors(vectors_b, len(vectors_b), np.shape(vectors_a)[-1])
    return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))


def load_calibration_pairs(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """(prompts_a, prompts_b, labels) of a labelled pair file (``raycache.data.read_pairs``)."""
    from raycache.data import DataError, read_pairs

    df = read_pairs(path)
    if "label" not in df.columns:
        raise DataError(f"{path}: calibration pairs need a 'label' column (1 = can share a response)")
    return df["prompt_a"].tolist(), df["prompt_b"].tolist(), df["label"].to_numpy(np.float64)


def policy_from_config(cfg: CacheConfig, encoder: Any = None) -> DecisionPolicy:
    """StaticThreshold(cfg.threshold), or CalibratedThreshold fitted on ``cfg.calibration_pairs``
    embedded with ``encoder`` (target δ = ``cfg.target_false_hit``); with ``cfg.policy_file``, the
    threshold of that file (``raycache calibrate``), checked against ``encoder.source`` when known."""
    if cfg.policy_file:
        from raycache.policy_file import PolicyFile, load_policy

        source = getattr(encoder, "source", None)
        policy_file = (load_policy(cfg.policy_file, source) if source is not None
                       else PolicyFile.read(cfg.policy_file))
        return policy_file.decision_policy(cfg.policy_file)
    if cfg.policy == "static":
        return StaticThreshold(cfg.threshold)
    if not cfg.calibration_pairs:
        raise ConfigError("cache.policy 'calibrated' needs cache.calibration_pairs (a labelled pair file)")
    if encoder is None:
        raise ConfigError("cache.policy 'calibrated' needs an encoder to embed the calibration pairs")
    prompts_a, prompts_b, labels = load_calibration_pairs(cfg.calibration_pairs)
    sims = row_cosines(encoder.encode(prompts_a), encoder.encode(prompts_b))
    policy = CalibratedThreshold.fit(sims, labels, cfg.target_false_hit, cfg.confidence)
    logger.info("calibrated policy: %s", policy.describe())
    return policy
