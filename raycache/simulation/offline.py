"""Offline replay: embed a stream once per model (Ray Data), then replay it in arrival order.

Each arrival is looked up in the cache; a miss stores the arrival (its prompt, response and vector).
Two replays make the same decisions:

* :func:`replay_engine` drives :class:`raycache.cache.engine.SemanticCache` (the engine the service
  runs) one arrival at a time with precomputed vectors. It covers every cache setting (capacity/LRU,
  TTL on a simulated clock, HNSW, the calibrated policy).
* :func:`replay_vectorized` is an exact re-formulation for the common case (static threshold, flat
  index, no TTL, capacity not reached). The stream is processed in chunks; each chunk's arrivals are
  matched against the entries stored before the chunk with one matrix product (a prompt seen before
  only against the entries added since), and against misses earlier in the same chunk through a
  running maximum that each new miss updates with one similarity column. All thresholds of a sweep
  share one pass over the vectors (one chunk read, shared columns), each keeping its own entries.
  Vectors are read chunk by chunk, so a memory-mapped ``.npy`` of any length replays in bounded
  memory. A threshold whose replay would need eviction is handed to the engine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from raycache.config import CacheConfig, ConfigError, EncoderConfig
from raycache.io import atomic_path
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


# ----------------------------------------------------------------------------- embedding


def embed_prompts(prompts: Sequence[str], encoder_cfg: EncoderConfig) -> np.ndarray:
    """Embed prompts with Ray Data (one encoder actor, 1 CPU) -> float32 [len(prompts), dim].

    Rows are matched back by an explicit index column, so the result is in input order whatever
    order Ray Data finishes batches in.
    """
    import ray.data

    from raycache.ray_embed import embed_dataset

    n = len(prompts)
    ds = ray.data.from_pandas(pd.DataFrame({"prompt": list(prompts), "row": np.arange(n)}))
    ds = embed_dataset(ds, encoder_cfg, num_actors=1, num_cpus=1.0)
    out: Optional[np.ndarray] = None
    filled = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=4096):
        vecs = batch["embedding"]
        vecs = np.stack(vecs) if vecs.dtype == object else vecs
        if out is None:
            out = np.zeros((n, vecs.shape[1]), np.float32)
        out[batch["row"]] = vecs
        filled += len(vecs)
    if out is None or filled != n:
        raise RuntimeError(f"embedding returned {filled} of {n} prompts")
    return out


def embed_stream(prompts: Sequence[str], encoder_cfg: EncoderConfig, out_path: Path,
                 chunk_size: int = 65536) -> np.ndarray:
    """Embed each distinct prompt once, write the stream-order matrix [n, dim] to ``out_path``
    (.npy, reusable as ``--embeddings``) chunk by chunk, and return it memory-mapped."""
    codes, uniques = pd.factorize(pd.Series(prompts, dtype=object))
    unique_vecs = embed_prompts(list(uniques), encoder_cfg)
    with atomic_path(out_path, keep_mode=True) as tmp:
        matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                           shape=(len(codes), unique_vecs.shape[1]))
        for start in range(0, len(codes), chunk_size):
            matrix[start:start + chunk_size] = unique_vecs[codes[start:start + chunk_size]]
        matrix.flush()
        del matrix
    return np.load(out_path, mmap_mode="r")


def load_embeddings(path: str, n_arrivals: int) -> np.ndarray:
    """Memory-map precomputed stream embeddings (.npy, float32 [n_arrivals, dim])."""
    try:
        vectors = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DataError(f"embeddings file not found: {path}") from None
    except ValueError as exc:
        raise DataError(f"{path}: not a .npy array ({exc})") from None
    if vectors.ndim != 2 or vectors.shape[0] != n_arrivals:
        raise DataError(f"{path}: shape {tuple(vectors.shape)}; expected [{n_arrivals}, dim], "
                        f"one row per arrival of the stream")
    if vectors.dtype != np.float32:
        raise DataError(f"{path}: dtype {vectors.dtype}; expected float32")
    return vectors


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

    Static policy, as the engine decides it: an arrival hits when its normalised prompt is stored
    in its namespace (exact tier) or the most similar stored vector of its namespace has cosine ≥
    threshold; a miss stores it. Returns {threshold: (decisions, None)}, or (None, reason) for a
    threshold the engine must replay: its cache outgrew ``capacity`` (LRU eviction would start), or
    (without the exact tier) a prompt was stored twice, which the engine treats as a replacement.
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
    threshold = run.threshold
    for i in range(m):
        if exact_tier:
            origin = known.get(keys[i])
            if origin is not None:
                hit[i] = exact[i] = True
                matched[i], similarity[i] = origin, 1.0
                continue
        best, best_row = prior_sim[i], prior_row[i]
        if local_sim[i] > best:
            best, best_row = local_sim[i], local_row[i]
        if best > -np.inf:
            similarity[i] = best
        if best >= threshold:
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


# ----------------------------------------------------------------------------- the offline job

from raycache.encoder import is_default_model  # noqa: E402


def resolve_model(model: Optional[str]) -> Optional[str]:
    """None (the embedded default) for None or the aliases 'default'/'base' (unless a folder of
    that name exists), else the model folder / hub id unchanged."""
    if is_default_model(model):
        return None
    return model


def model_names(models: Sequence[Optional[str]]) -> list[str]:
    """Display names as in evaluation's metrics.json ('base', or the model folder's name), unique."""
    from raycache.evaluation import model_label

    names: list[str] = []
    for model in models:
        name = model_label(model)
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def simulate_model(stream: pd.DataFrame, vectors: np.ndarray, cfg, mode: str,
                   model: Optional[str] = None) -> dict:
    """Sweep (or the single ``cfg.threshold``) for one model's stream vectors -> its report entry.

    With the calibrated policy (and no ``cfg.threshold``), the engine also replays the stream under
    the policy fitted for ``model`` (entry ``calibrated``). The per-threshold Decisions are returned
    under ``"_decisions"`` (to be removed before writing JSON).
    """
    from raycache.simulation.metrics import headline, replay_metrics

    replay_stream = ReplayStream.from_frame(stream, vectors)
    thresholds = ([cfg.threshold] if cfg.threshold is not None
                  else list(cfg.thresholds) or default_thresholds())
    times = arrival_times(stream, cfg.rate)
    started = time.perf_counter()
    decisions, used = replay_sweep(replay_stream, cfg.cache, thresholds, cfg.replay,
                                   cfg.chunk_size, times)
    replay_s = time.perf_counter() - started
    sweep = [{**replay_metrics(stream, decisions[t], t, mode), "replay": used[t]}
             for t in sorted(decisions)]
    entry = {
        "replay_seconds": round(replay_s, 3),
        # every (arrival, threshold) decision counts: a sweep replays the stream once per threshold
        "arrivals_per_s": round(len(stream) * len(thresholds) / max(replay_s, 1e-9), 1),
        "thresholds": len(thresholds),
        "sweep": sweep,
        "headline": headline(sweep, cfg.delta),
    }
    if cfg.cache.policy == "calibrated" and cfg.threshold is None:
        from raycache.cache.engine import policy_from_config
        from raycache.encoder import Encoder

        encoder = Encoder.load(model, device=cfg.encoder.device, max_length=cfg.encoder.max_length)
        policy = policy_from_config(cfg.cache, encoder)
        calibrated, _ = replay_engine(replay_stream, cfg.cache, policy=policy, times=times,
                                      chunk_size=cfg.chunk_size)
        threshold = policy.threshold if np.isfinite(policy.threshold) else None
        entry["calibrated"] = {**replay_metrics(stream, calibrated, threshold, mode),
                               "policy": policy.describe(), "replay": "engine"}
    if getattr(cfg, "policy", None):
        entry["policy"] = policy_replay(stream, replay_stream, cfg, mode, model, times)
    entry["_decisions"] = decisions
    return entry


def policy_replay(stream: pd.DataFrame, replay_stream: ReplayStream, cfg, mode: str,
                  model: Optional[str], times: Optional[np.ndarray] = None) -> dict:
    """Replay under the policy file ``cfg.policy`` (checked against ``model``; nothing refitted):
    its metrics, the file's claims, and whether the realised rate of its bound kind is ≤ its δ."""
    from raycache.calibration import load_policy
    from raycache.simulation.metrics import replay_metrics

    policy_file = load_policy(cfg.policy, model)
    policy = policy_file.decision_policy(cfg.policy)
    decisions, _ = replay_engine(replay_stream, cfg.cache, policy=policy, times=times,
                                 chunk_size=cfg.chunk_size)
    m = replay_metrics(stream, decisions, policy_file.threshold, mode)
    realised = None
    if m["false_hits"] is not None:
        realised = (m["false_hit_rate"] if policy_file.bound == "per_request"
                    else (m["false_hits"] / m["hits"] if m["hits"] else 0.0))
    return {**m, "replay": "engine", "policy": policy.describe(), "bound": policy_file.bound,
            "realised_rate": realised,
            "within_delta": None if realised is None else bool(realised <= policy_file.delta + 1e-12)}


def operating_point_entry(cfg, stream: pd.DataFrame, vectors: np.ndarray, model: Optional[str],
                          name: str, out: Path, mode: str) -> Optional[dict]:
    """The operating point (:mod:`raycache.simulation.operating`) for one model: calibration on
    ``cfg.calibration_stream`` (test = the stream), else on half of the stream's groups."""
    from raycache.simulation.operating import operating_point, operating_point_split

    if not cfg.operating_point or mode == "unknown":
        return None
    common = dict(deltas=cfg.operating_deltas, confidence=cfg.confidence, cache=cfg.cache)
    if not cfg.calibration_stream:
        if len(stream) < 2:
            return None
        try:
            return operating_point_split(stream, vectors, model, seed=cfg.seed, **common)
        except DataError as exc:
            logger.warning("%s: no operating point: %s", name, exc)
            return {"skipped": str(exc)}
    from raycache.data import parse_columns, read_stream

    calib = read_stream(cfg.calibration_stream, columns=parse_columns(cfg.read.columns),
                        skip_invalid=cfg.read.skip_invalid)
    if cfg.calibration_embeddings:
        calib_vectors = load_embeddings(cfg.calibration_embeddings, len(calib))
    elif cfg.embeddings:
        raise ConfigError("calibration_stream with precomputed embeddings needs "
                          "calibration_embeddings too")
    else:
        _ensure_ray()
        calib_vectors = embed_stream(calib["prompt"].astype(str).tolist(),
                                     cfg.encoder.model_copy(update={"model": model}),
                                     out / "embeddings" / f"{name}_calibration.npy")
    result = operating_point(calib, stream, model, calib_vectors=np.asarray(calib_vectors),
                             test_vectors=np.asarray(vectors), **common)
    result["split"] = {"calibration": cfg.calibration_stream, "test": cfg.stream}
    return result


def run_offline(cfg, stream: pd.DataFrame, out: Path) -> dict:
    """Embed (or load) the stream's vectors per model, replay, score; returns the report dict."""
    from raycache.simulation.metrics import correctness_mode, oracle_hits
    from raycache.simulation.plot import plot_hit_vs_false_hit

    models = [resolve_model(m) for m in (cfg.models or [cfg.encoder.model])]
    if cfg.policy and len(models) > 1:
        raise ConfigError("policy: a policy file is fitted for one model; "
                          f"got {len(models)} models")
    if cfg.policy:  # refuse a policy fitted for another model before embedding anything
        from raycache.calibration import load_policy

        load_policy(cfg.policy, models[0])
    if cfg.embeddings and len(models) > 1:
        raise ConfigError("embeddings: one precomputed .npy matches one model; "
                          f"got {len(models)} models")
    mode = correctness_mode(stream)
    oracle = oracle_hits(stream, mode)
    report: dict = {
        "mode": "offline", "stream": cfg.stream, "arrivals": len(stream), "correctness": mode,
        "oracle_hit_rate": float(oracle.mean()) if mode != "unknown" else None,
        "delta": cfg.delta, "cache": cfg.cache.model_dump(), "models": {},
    }
    for model, name in zip(models, model_names(models)):
        started = time.perf_counter()
        if cfg.embeddings:
            vectors = load_embeddings(cfg.embeddings, len(stream))
            source = cfg.embeddings
        else:
            _ensure_ray()
            encoder_cfg = cfg.encoder.model_copy(update={"model": model})
            vectors = embed_stream(stream["prompt"].astype(str).tolist(), encoder_cfg,
                                   out / "embeddings" / f"{name}.npy")
            source = str(out / "embeddings" / f"{name}.npy")
        embed_s = time.perf_counter() - started
        entry = simulate_model(stream, vectors, cfg, mode, model)
        decisions = entry.pop("_decisions")
        if cfg.online_start is not None and mode != "unknown":
            from raycache.cache.online_policy import OnlineSettings
            from raycache.simulation.online import simulate_online

            entry["online"] = simulate_online(
                stream, vectors, cfg.online_start,
                OnlineSettings(delta=cfg.delta, confidence=cfg.confidence), cfg.cache, cfg.seed)
            logger.info("%s: online from %.3f: false-hit %.4f, hit rate %.4f, final thresholds %s, "
                        "%.3f extra upstream calls per request", name, cfg.online_start,
                        entry["online"]["false_hit_rate"], entry["online"]["hit_rate"],
                        entry["online"]["final_thresholds"],
                        entry["online"]["extra_upstream_calls_per_request"])
        op = operating_point_entry(cfg, stream, vectors, model, name, out, mode)
        if op is not None:
            entry["operating_point"] = op
            for d in op.get("deltas", []):
                fs, best = d["fixed_sequence"], d["best_on_test"]
                logger.info("%s: δ=%g: correct-hit %.4f (false-hit %.4f, threshold %s) with the "
                            "calibrated threshold; best on the test part %s", name, d["delta"],
                            fs["correct_hit_rate"], fs["false_hit_rate"], fs["threshold"],
                            f"{best['correct_hit_rate']:.4f}" if best else "none")
        if cfg.threshold is not None:
            path = out / f"decisions_{name}.parquet"
            decisions[float(cfg.threshold)].to_frame().to_parquet(path)
            entry["decisions"] = str(path)
        report["models"][name] = {"model": model or "all-MiniLM-L6-v2 (embedded default)",
                                  "embeddings": source, "embed_seconds": round(embed_s, 3), **entry}
        best = entry["headline"]
        logger.info("%s: %d arrivals x %d thresholds replayed at %.0f arrivals/s; %s", name,
                    len(stream), entry["thresholds"], entry["arrivals_per_s"],
                    f"hit rate {best['hit_rate']:.3f} at false-hit rate {best['false_hit_rate']:.4f} "
                    f"(threshold {best['threshold']:g})" if best else f"no threshold with false-hit "
                    f"rate <= {cfg.delta:g}")
    plot = plot_hit_vs_false_hit({name: m["sweep"] for name, m in report["models"].items()},
                                 cfg.delta, out / "hit_vs_false_hit.png", report["oracle_hit_rate"])
    report["plot"] = str(plot) if plot else None
    return report


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)
