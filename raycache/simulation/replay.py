"""Replay a stream through the cache's decisions, in arrival order: one definition of a hit.

Each arrival is looked up in the cache; a miss stores the arrival (its prompt, response and vector).
Both replays decide by the engine's one rule (:mod:`raycache.cache.decision`: the nearest entry of
the arrival's namespace, an exact-tier match at similarity 1, hit iff similarity ≥ threshold):

* :func:`replay_engine` drives :class:`raycache.cache.engine.SemanticCache` (the engine the service
  runs) one arrival at a time with precomputed vectors. It covers every cache setting (capacity/LRU,
  TTL on a simulated clock, HNSW, the calibrated policy).
* :func:`replay_vectorized` is an exact re-formulation of the search for the common case (static
  threshold, flat index, no TTL, capacity not reached). The stream is processed in chunks; each
  chunk's arrivals are matched against the entries stored before the chunk with one matrix product
  (a prompt seen before only against the entries added since), and against misses earlier in the
  same chunk through a running maximum that each new miss updates with one similarity column. All
  thresholds of a sweep share one pass over the vectors (one chunk read, shared columns), each
  keeping its own entries. Vectors are read chunk by chunk, so a memory-mapped ``.npy`` of any
  length replays in bounded memory. A threshold whose replay would need eviction or replacement is
  handed to the engine.

:func:`replay_sweep` picks between them per threshold; :class:`ReplayStream` is what both read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from raycache.cache.decision import EXACT_SIMILARITY, is_candidate, meets
from raycache.config import CacheConfig, ConfigError
from raycache.numeric import unit_rows as _unit_rows
from raycache.data import DataError, normalize_text, stream_namespaces
from raycache.simulation.metrics import Decisions

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 2048
MEMO_ENTRIES = 2_000_000  # remembered best matches of repeated prompts, shared by a sweep's thresholds


@dataclass
class ReplayStream:
    """What a replay needs per arrival, in arrival order: ``prompts``, ``namespaces``,
    ``responses`` [n] (object), ``text_keys`` [n] int64 (equal iff the normalised prompts are equal:
    the exact tier's key), ``vectors`` [n, dim] float32 (may be a read-only memmap)."""

    prompts: np.ndarray
    namespaces: np.ndarray
    responses: np.ndarray
    text_keys: np.ndarray
    vectors: np.ndarray

    @classmethod
    def from_frame(cls, stream: pd.DataFrame, vectors: np.ndarray) -> "ReplayStream":
        n = len(stream)
        if vectors.ndim != 2 or vectors.shape[0] != n:
            raise DataError(f"embeddings have shape {tuple(vectors.shape)}; expected [{n}, dim] "
                            f"(one row per arrival of the stream)")
        namespaces = stream_namespaces(stream)
        if "response" in stream.columns:
            responses = stream["response"].to_numpy(dtype=object).copy()
            missing = pd.isna(responses)
            responses[missing] = [placeholder_response(i) for i in np.flatnonzero(missing)]
        else:
            responses = np.array([placeholder_response(i) for i in range(n)], dtype=object)
        prompts = stream["prompt"].astype(str).to_numpy(dtype=object)
        return cls(prompts=prompts, namespaces=namespaces, responses=responses,
                   text_keys=text_keys(prompts), vectors=vectors)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def read_stream_frame(cfg) -> pd.DataFrame:
    """The stream of a simulate / calibrate config (``cfg.stream``, ``cfg.read``) as a validated
    DataFrame in arrival order (``raycache.data.read_stream``)."""
    from raycache.data import parse_columns, read_stream

    return read_stream(cfg.stream, columns=parse_columns(cfg.read.columns),
                       skip_invalid=cfg.read.skip_invalid)


def text_keys(prompts: Sequence[str]) -> np.ndarray:
    """int64 [n]: equal exactly when ``normalize_text`` of the prompts is equal (each distinct
    prompt is normalised once)."""
    codes, distinct = pd.factorize(pd.Series(prompts, dtype=object))
    normalised = pd.Series([normalize_text(p) for p in distinct], dtype=object)
    key_of_distinct, _ = pd.factorize(normalised)
    return key_of_distinct[codes].astype(np.int64)


def placeholder_response(row: int) -> str:
    """Response stored for an arrival whose stream row has none."""
    return f"[simulated response to arrival {row}]"


def default_thresholds() -> list[float]:
    """The sweep grid: 0.30 … 0.99 in steps of 0.01, plus 0.995."""
    return [round(0.30 + 0.01 * i, 2) for i in range(70)] + [0.995]



# ----------------------------------------------------------------------------- vectorized replay


class _Scope:
    """One namespace's stored entries under one threshold.

    ``vectors[:size]`` / ``rows[:size]``: the entries' unit vectors and arrival rows, in insertion
    order (append-only: nothing is evicted on this path); ``stored_keys``: text key -> row of every
    entry (the exact tier's table); ``memo``: (text key, vector hash) -> (best similarity, its row,
    entries searched), so a repeated prompt is only compared with the entries added since.
    """

    def __init__(self, dim: int, memo_limit: int):
        self.vectors = np.empty((64, dim), np.float32)
        self.rows = np.empty(64, np.int64)
        self.size = 0
        self.stored_keys: dict[int, int] = {}
        self.memo: dict[tuple[int, int], tuple[float, int, int]] = {}
        self.memo_limit = memo_limit

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        end = self.size + len(rows)
        if end > len(self.rows):
            capacity = max(end, 2 * len(self.rows))
            self.vectors = np.concatenate([self.vectors[:self.size],
                                           np.empty((capacity - self.size, self.vectors.shape[1]), np.float32)])
            self.rows = np.concatenate([self.rows[:self.size], np.empty(capacity - self.size, np.int64)])
        self.vectors[self.size:end], self.rows[self.size:end] = vectors, rows
        self.size = end

    def search(self, queries: np.ndarray, since: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Best inner product of each query [q, dim] among entries [since, size) -> (sims [q],
        rows [q]); ties go to the earliest entry."""
        sims = queries @ self.vectors[since:self.size].T
        best = sims.argmax(axis=1)
        return sims[np.arange(len(queries)), best], self.rows[since:self.size][best]

    def remember(self, key: tuple[int, int], sim: float, row: int, searched: int) -> None:
        if key in self.memo or len(self.memo) < self.memo_limit:
            self.memo[key] = (sim, row, searched)


class _ThresholdRun:
    """One threshold's replay state; ``handoff`` says why the engine must take over (else None)."""

    def __init__(self, threshold: float, n: int, memo_limit: int):
        self.threshold = float(threshold)
        self.memo_limit = memo_limit
        self.scopes: dict[str, _Scope] = {}
        self.stored = 0
        self.handoff: Optional[str] = None
        self.decisions = Decisions.empty(n)


def vectorized_supported(cache: CacheConfig) -> Optional[str]:
    """None when :func:`replay_vectorized` can reproduce the engine under ``cache``; else why not."""
    if cache.index != "flat":
        return "the HNSW index (approximate search)"
    if cache.ttl_s is not None:
        return "TTL expiry"
    return None


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, the same computation the engine applies to the vectors it gets
    (:func:`raycache.numeric.unit_rows`); DataError for a non-finite or zero row."""
    return _unit_rows(x, DataError, "embeddings")


def replay_vectorized(stream: ReplayStream, thresholds: Sequence[float], exact_tier: bool = True,
                      capacity: Optional[int] = None, chunk_size: int = DEFAULT_CHUNK,
                      ) -> dict[float, tuple[Optional[Decisions], Optional[str]]]:
    """Replay the stream once for every threshold, in one pass over the vectors.

    Static policy, decided by the engine's rule (:mod:`raycache.cache.decision`): an arrival's
    candidate is its normalised prompt stored in its namespace (exact tier, similarity 1) or else
    the most similar stored vector of its namespace; hit iff ``meets(similarity, threshold)``; a
    miss stores it. Returns {threshold: (decisions, None)}, or (None, reason) for a threshold the
    engine must replay: its cache outgrew ``capacity`` (LRU eviction would start), or a prompt was
    stored twice (without the exact tier, or a threshold above 1), which the engine treats as a
    replacement.
    """
    n = len(stream)
    runs = [_ThresholdRun(t, n, MEMO_ENTRIES // max(len(thresholds), 1)) for t in thresholds]
    with single_threaded_math():
        for start in range(0, n, chunk_size):
            _replay_chunk(stream, runs, start, min(start + chunk_size, n), exact_tier, capacity)
    return {run.threshold: (None if run.handoff else run.decisions, run.handoff) for run in runs}


def single_threaded_math():
    """Limit BLAS (and OpenMP) to one thread: the replay makes many small matrix products, for
    which thread start-up and contention on shared cores cost more than they save."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _replay_chunk(stream: ReplayStream, runs: list[_ThresholdRun], start: int, stop: int,
                  exact_tier: bool, capacity: Optional[int]) -> None:
    """Advance every threshold's replay over arrivals [start, stop)."""
    vecs = unit_rows(stream.vectors[start:stop])
    keys = stream.text_keys[start:stop]
    spaces = stream.namespaces[start:stop]
    for space in dict.fromkeys(spaces.tolist()):
        pos = np.flatnonzero(spaces == space)
        block = _Block(start + pos, vecs[pos], keys[pos].tolist())
        for run in runs:
            if run.handoff:
                continue
            scope = run.scopes.get(space)
            if scope is None:
                scope = run.scopes[space] = _Scope(stream.dim, run.memo_limit)
            _replay_block(run, scope, block, exact_tier)
            if capacity is not None and run.stored > capacity:
                run.handoff = f"the cache outgrew its capacity ({capacity})"
            if run.handoff:
                run.scopes.clear()


class _Block:
    """One namespace's arrivals within one chunk: rows [m], unit vectors [m, dim], text keys [m].

    ``column(i)`` is the cosine of every arrival of the block to arrival ``i`` [m], computed once
    and shared by all thresholds that store ``i`` (at most the block's Gram matrix in total, and
    usually a few columns, since most arrivals hit).
    """

    def __init__(self, rows: np.ndarray, vectors: np.ndarray, keys: list[int]):
        self.rows, self.vectors, self.keys = rows, vectors, keys
        self._columns: dict[int, np.ndarray] = {}
        self._memo_keys: Optional[list[tuple[int, int]]] = None

    @property
    def memo_keys(self) -> list[tuple[int, int]]:
        """(text key, 64-bit hash of the vector's bytes) per arrival: arrivals with equal keys have
        the same prompt and vector, hence the same search results."""
        if self._memo_keys is None:
            self._memo_keys = [(k, hash(v.tobytes())) for k, v in zip(self.keys, self.vectors)]
        return self._memo_keys

    def column(self, i: int) -> np.ndarray:
        col = self._columns.get(i)
        if col is None:
            col = self._columns[i] = self.vectors @ self.vectors[i]
        return col


def _prior_matches(scope: _Scope, block: _Block, exact_tier: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best match of each block arrival among the entries stored before the block -> (sims [m],
    rows [m]; -inf / -1 where none or not needed). Exact-tier repeats need none; a prompt seen
    before is compared only with the entries added since (memo); the rest in one matrix product."""
    m = len(block.rows)
    sims = np.full(m, -np.inf, np.float32)
    rows = np.full(m, -1, np.int64)
    size = scope.size
    if not size:
        return sims, rows
    known, memo = scope.stored_keys, scope.memo
    fresh: list[int] = []
    for i, key in enumerate(block.memo_keys):
        if exact_tier and key[0] in known:
            continue
        found = memo.get(key)
        if found is None:
            fresh.append(i)
            continue
        sim, row, searched = found
        if searched < size:
            (new_sim,), (new_row,) = scope.search(block.vectors[i:i + 1], since=searched)
            if new_sim > sim:
                sim, row = float(new_sim), int(new_row)
            memo[key] = (sim, row, size)
        sims[i], rows[i] = sim, row
    if fresh:
        found_sims, found_rows = scope.search(block.vectors[fresh])
        sims[fresh], rows[fresh] = found_sims, found_rows
        keys = block.memo_keys
        for i, sim, row in zip(fresh, found_sims.tolist(), found_rows.tolist()):
            scope.remember(keys[i], sim, row, size)
    return sims, rows


def _replay_block(run: _ThresholdRun, scope: _Scope, block: _Block, exact_tier: bool) -> None:
    """Decide one block's arrivals in order under one threshold, and store its misses.

    The best match of arrival i is the better of (a) the entries stored before the block
    (:func:`_prior_matches`) and (b) the block's own earlier misses, kept as a running maximum that
    each new miss updates with its similarity column.
    """
    rows, keys, m = block.rows, block.keys, len(block.rows)
    known = scope.stored_keys
    prior_sim, prior_row = _prior_matches(scope, block, exact_tier)
    local_sim = np.full(m, -np.inf, np.float32)
    local_row = np.full(m, -1, np.int64)
    hit = np.zeros(m, bool)
    exact = np.zeros(m, bool)
    matched = np.full(m, -1, np.int64)
    similarity = np.full(m, np.nan, np.float32)
    stored: list[int] = []
    threshold = run.threshold  # a StaticThreshold's rule, raycache.cache.decision.meets
    serve_exact = meets(EXACT_SIMILARITY, threshold)
    for i in range(m):
        if exact_tier:
            origin = known.get(keys[i])
            if origin is not None:
                if not serve_exact:  # the engine's miss would replace that entry
                    run.handoff = "the threshold refuses exact-tier matches (the engine replaces the entry)"
                    return
                hit[i] = exact[i] = True
                matched[i], similarity[i] = origin, EXACT_SIMILARITY
                continue
        best, best_row = prior_sim[i], prior_row[i]
        if local_sim[i] > best:
            best, best_row = local_sim[i], local_row[i]
        if is_candidate(best):
            similarity[i] = best
        if meets(best, threshold):
            hit[i], matched[i] = True, best_row
            continue
        if keys[i] in known:  # only without the exact tier: the engine would replace that entry
            run.handoff = "a prompt was stored twice (the engine replaces the first entry)"
            return
        known[keys[i]] = int(rows[i])
        stored.append(i)
        if i + 1 < m:
            tail = block.column(i)[i + 1:]
            better = tail > local_sim[i + 1:]
            local_sim[i + 1:][better] = tail[better]
            local_row[i + 1:][better] = rows[i]
    dec = run.decisions
    dec.hit[rows], dec.exact[rows], dec.matched_row[rows], dec.similarity[rows] = (
        hit, exact, matched, similarity)
    if stored:
        scope.add(rows[stored], block.vectors[stored])
        run.stored += len(stored)


# ----------------------------------------------------------------------------- engine replay


def arrival_times(stream: pd.DataFrame, rate: Optional[float] = None) -> np.ndarray:
    """Arrival time of each arrival in seconds [n] (the offline clock TTL expiry runs on): the
    stream's ``timestamp`` column when it has one, else evenly spaced at ``rate`` arrivals/s
    (default 1/s)."""
    if "timestamp" in stream.columns:
        times = pd.to_numeric(stream["timestamp"], errors="coerce").to_numpy(np.float64)
        if np.isnan(times).any() or (np.diff(times) < 0).any():
            raise DataError("stream column 'timestamp' must be numeric seconds, non-decreasing "
                            "in arrival order")
        return times
    return np.arange(len(stream), dtype=np.float64) / (rate or 1.0)


def replay_engine(stream: ReplayStream, cache_cfg: CacheConfig, threshold: Optional[float] = None,
                  policy=None, times: Optional[np.ndarray] = None,
                  chunk_size: int = DEFAULT_CHUNK) -> tuple[Decisions, dict]:
    """Replay through :class:`SemanticCache` built from ``cache_cfg``, one arrival at a time with
    precomputed vectors: check, and store on a miss.

    The decision policy is a static ``threshold`` when given, else ``policy`` (e.g. a fitted
    calibrated one), else the config's static threshold. ``times`` [n] (seconds) drive the cache's
    clock, so TTLs expire in simulated time (default: one arrival per second).
    Returns (decisions, the engine's ``stats()`` at the end).
    """
    from raycache.cache.engine import SemanticCache
    from raycache.cache.policy import StaticThreshold

    n = len(stream)
    times = np.arange(n, dtype=np.float64) if times is None else times
    if threshold is not None:
        policy = StaticThreshold(float(threshold))
    now = [0.0]
    cache = SemanticCache.from_config(cache_cfg.model_copy(update={"persist_path": None}),
                                      encoder=None, dim=stream.dim, policy=policy,
                                      clock=lambda: now[0])
    dec = Decisions.empty(n)
    origin_of_entry: dict[int, int] = {}
    with single_threaded_math():  # one-query FAISS searches: OpenMP threads only add overhead
        for start in range(0, n, chunk_size):
            vecs = np.ascontiguousarray(stream.vectors[start:start + chunk_size], dtype=np.float32)
            for k, vec in enumerate(vecs):
                row = start + k
                now[0] = float(times[row])
                prompt, space = stream.prompts[row], stream.namespaces[row]
                result = cache.check(prompt, namespace=space, vector=vec)
                if result.similarity is not None:
                    dec.similarity[row] = result.similarity
                if result.hit:
                    dec.hit[row], dec.exact[row] = True, bool(result.exact)
                    dec.matched_row[row] = origin_of_entry.get(result.entry_id, -1)
                else:
                    entry = cache.store(prompt, stream.responses[row], namespace=space, vector=vec)
                    origin_of_entry[int(entry)] = row
    return dec, cache.stats()


# ----------------------------------------------------------------------------- sweep


def replay_sweep(stream: ReplayStream, cache_cfg: CacheConfig, thresholds: Sequence[float],
                 replay: str = "auto", chunk_size: int = DEFAULT_CHUNK,
                 times: Optional[np.ndarray] = None,
                 ) -> tuple[dict[float, Decisions], dict[float, str]]:
    """Decisions for every threshold (static policy) and which replay produced each.

    ``replay``: 'vectorized' (only; an error where it cannot reproduce the engine), 'engine', or
    'auto' (vectorized where exact, the engine for the other thresholds and settings).
    ``times``: arrival times for the engine's clock (see :func:`arrival_times`).
    """
    thresholds = [float(t) for t in thresholds]
    reason = vectorized_supported(cache_cfg)
    if replay == "vectorized" and reason:
        raise ConfigError(f"replay='vectorized' cannot reproduce the engine with {reason}; "
                          f"use replay='auto' or 'engine'")
    results: dict[float, Optional[Decisions]] = dict.fromkeys(thresholds)
    used = dict.fromkeys(thresholds, "engine" if replay == "engine" else f"engine ({reason})")
    if replay != "engine" and reason is None:
        for t, (decisions, handoff) in replay_vectorized(stream, thresholds, cache_cfg.exact_tier,
                                                         cache_cfg.capacity, chunk_size).items():
            if handoff and replay == "vectorized":
                raise ConfigError(f"threshold {t:g}: replay='vectorized' cannot reproduce the "
                                  f"engine here: {handoff}; use replay='auto'")
            results[t], used[t] = decisions, f"engine ({handoff})" if handoff else "vectorized"
    for t in thresholds:
        if results[t] is None:
            results[t], _ = replay_engine(stream, cache_cfg, t, times=times, chunk_size=chunk_size)
    return results, used
