"""Live replay: a pool of HTTP client actors replays a stream against a running raycache service.

Ray Data reads the stream (in file order). Arrivals are sharded by ``(namespace, group)`` (by the
normalised prompt when the stream has no groups), one shard per client actor, each replayed in
arrival order. Sharding by group keeps what decides a correct hit in stream order: a group's first
arrival is stored before its later paraphrases are looked up, exactly as offline. Contiguous blocks
would not: with several clients, a repeat in block 2 could be looked up before its group's first
arrival in block 1 was stored. What may differ from offline with several clients is only the timing
between groups (a near-miss from another group stored a moment earlier or later).

Each client looks arrivals up in batches and stores on a miss (the stream's ``response`` or a
placeholder). A store changes the cache, so after a miss the rest of the batch is looked up again:
every decision is the one a one-by-one replay makes, and with one client the decisions equal the
offline replay's for the same model and threshold. ``rate`` spaces arrivals on one timeline (arrival
k is due at k / rate seconds), ``duration`` stops the replay, and connection errors, timeouts, 429
and 5xx answers are retried with exponential backoff (a replica may be restarting).
"""

from __future__ import annotations

import logging
import os
import random
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from raycache.data import DataError, normalize_text, stream_namespaces
from raycache.simulation.metrics import (Decisions, correctness_mode, latency_summary, oracle_hits,
                                         replay_metrics)

logger = logging.getLogger(__name__)

CLIENT_NUM_CPUS = 0.1
MAX_BACKOFF_S = 5.0


class LiveReplayError(RuntimeError):
    """The service refused a request (4xx) or kept failing after every retry."""


# ----------------------------------------------------------------------------- reading, sharding


def read_stream_ray(cfg) -> pd.DataFrame:
    """The stream read by Ray Data (``raycache.data.read_dataset``), in arrival (file) order."""
    import ray.data

    from raycache.data import parse_columns, read_dataset

    ds = read_dataset(cfg.stream, "stream", columns=parse_columns(cfg.read.columns),
                      skip_invalid=cfg.read.skip_invalid)
    ctx = ray.data.DataContext.get_current()
    previous = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        frames = list(ds.iter_batches(batch_format="pandas", batch_size=65536))
    finally:
        ctx.execution_options.preserve_order = previous
    frames = [f for f in frames if len(f)]
    if not frames:
        raise DataError(f"{cfg.stream}: no arrivals")
    return pd.concat(frames, ignore_index=True)


def shard_of(namespace: str, key: str, shards: int) -> int:
    """Stable shard of an arrival (crc32 of namespace + group or normalised prompt)."""
    return zlib.crc32(f"{namespace}\x00{key}".encode("utf-8", "surrogatepass")) % shards


def make_shards(stream: pd.DataFrame, shards: int) -> list[dict[str, list]]:
    """Split arrivals into ``shards`` lists (rows in arrival order), by (namespace, group)."""
    n = len(stream)
    spaces = stream_namespaces(stream).tolist()
    groups = stream["group"].tolist() if "group" in stream.columns else [None] * n
    prompts = stream["prompt"].astype(str).tolist()
    responses = (stream["response"].tolist() if "response" in stream.columns else [None] * n)
    out = [{"rows": [], "prompts": [], "namespaces": [], "responses": []} for _ in range(shards)]
    for row in range(n):
        group = groups[row]
        key = str(group) if group is not None and not pd.isna(group) else normalize_text(prompts[row])
        shard = out[shard_of(spaces[row], key, shards)]
        response = responses[row]
        shard["rows"].append(row)
        shard["prompts"].append(prompts[row])
        shard["namespaces"].append(spaces[row])
        shard["responses"].append(response if isinstance(response, str) and response
                                  else f"[simulated response to arrival {row}]")
    return [s for s in out if s["rows"]]


# ----------------------------------------------------------------------------- the client actor


class HttpReplayClient:
    """Replays one shard over HTTP (a Ray actor; also usable in-process).

    ``transport``: an httpx transport to use instead of the network (tests).
    """

    def __init__(self, endpoint: str, api_key: Optional[str] = None, timeout_s: float = 30.0,
                 max_retries: int = 6, lookup_batch: int = 32, backoff_s: float = 0.1,
                 transport: Any = None, adaptive_batch: bool = False):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=endpoint.rstrip("/"), headers=headers, timeout=timeout_s,
                                   transport=transport)
        self.max_retries = max_retries
        self.lookup_batch = lookup_batch
        # after a miss cut a batch, the next is ~2x the run of hits before the cut (a full batch
        # doubles, up to lookup_batch): the service re-embeds far fewer prompts; same decisions
        self.adaptive_batch = adaptive_batch
        self.backoff_s = backoff_s
        self.retries = 0
        self.requests = 0

    def ready(self) -> bool:
        return True

    def _post(self, path: str, payload: dict) -> tuple[dict, float]:
        """POST JSON; retries transport errors, 429 and 5xx with backoff. -> (body, seconds)."""
        import httpx

        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                           * (0.5 + random.random()))
            started = time.perf_counter()
            try:
                response = self.client.post(path, json=payload)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                problem = f"{type(exc).__name__}: {exc}"
                continue
            finally:
                self.requests += 1
            elapsed = time.perf_counter() - started
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise LiveReplayError(f"POST {path} was refused: HTTP {response.status_code}: "
                                      f"{response.text[:300]}")
            return response.json(), elapsed
        raise LiveReplayError(f"POST {path} failed after {self.max_retries} retries: {problem}")

    def replay(self, shard: dict[str, list], start_at: float, rate: Optional[float] = None,
               stop_at: Optional[float] = None, progress_name: Optional[str] = None) -> dict[str, Any]:
        """Replay the shard in order: batched lookups; on a miss, store and look the rest up again.

        ``start_at``/``stop_at``: wall-clock seconds (``time.time()``); with ``rate``, arrival row k
        is not sent before ``start_at + k / rate``. Returns per-arrival decisions of the arrivals
        replayed, request latencies (seconds) and counters.
        """
        rows, prompts = shard["rows"], shard["prompts"]
        spaces, responses = shard["namespaces"], shard["responses"]
        n = len(rows)
        out: dict[str, list] = {k: [] for k in ("row", "hit", "similarity", "entry_id", "exact",
                                                "lookup_s", "store_s")}
        delay = max(0.0, start_at - time.time())
        time.sleep(delay)
        pos = 0
        reported = time.monotonic()
        size = self.lookup_batch
        while pos < n:
            if progress_name and time.monotonic() - reported >= 1.0:
                from raycache.progress import report_line

                report_line(progress_name, pos, n, unit="arrivals")
                reported = time.monotonic()
            now = time.time()
            if stop_at is not None and now >= stop_at:
                break
            end = pos + 1
            if rate is not None:
                due = start_at + rows[pos] / rate
                if due > now:
                    time.sleep(due - now)
                    now = time.time()
                while end < n and end - pos < size and start_at + rows[end] / rate <= now:
                    end += 1
            else:
                end = min(n, pos + size)
            end = next((j for j in range(pos + 1, end) if spaces[j] != spaces[pos]), end)
            body, elapsed = self._post("/v1/cache/lookup",
                                       {"prompts": prompts[pos:end], "namespace": spaces[pos]})
            out["lookup_s"].append(elapsed)
            results = body["results"]
            if len(results) != end - pos:
                raise LiveReplayError(f"lookup of {end - pos} prompts returned {len(results)} results")
            for j, result in enumerate(results, start=pos):
                out["row"].append(rows[j])
                out["similarity"].append(result.get("similarity"))
                out["exact"].append(bool(result.get("exact", False)))
                if result["hit"]:
                    out["hit"].append(True)
                    out["entry_id"].append(result.get("entry_id"))
                    continue
                stored, elapsed = self._post("/v1/cache/store", {
                    "prompt": prompts[j], "response": responses[j], "namespace": spaces[j]})
                out["store_s"].append(elapsed)
                out["hit"].append(False)
                out["entry_id"].append(stored["entry_id"])
                if self.adaptive_batch:
                    size = max(1, min(self.lookup_batch, 2 * (j + 1 - pos)))
                pos = j + 1  # the cache changed: the rest of the batch is looked up again
                break
            else:
                if self.adaptive_batch:
                    size = min(self.lookup_batch, 2 * size)
                pos = end
        out.update(requests=self.requests, retries=self.retries, finished_at=time.time())
        return out

    def close(self) -> None:
        self.client.close()


# ----------------------------------------------------------------------------- the live job


def collect_decisions(n: int, parts: list[dict[str, Any]]) -> tuple[Decisions, np.ndarray]:
    """Merge the clients' outputs -> (Decisions over all n arrivals, replayed mask [n]).

    A hit's matched row is the arrival whose store returned that entry id (-1 if the entry was
    already in the cache before this replay).
    """
    dec = Decisions.empty(n)
    replayed = np.zeros(n, bool)
    origin: dict[int, int] = {}
    for part in parts:
        for row, hit, entry in zip(part["row"], part["hit"], part["entry_id"]):
            if not hit and entry is not None:
                origin[int(entry)] = row
    for part in parts:
        for row, hit, sim, entry, exact in zip(part["row"], part["hit"], part["similarity"],
                                               part["entry_id"], part["exact"]):
            replayed[row] = True
            dec.hit[row], dec.exact[row] = hit, exact
            if sim is not None:
                dec.similarity[row] = sim
            if hit and entry is not None:
                dec.matched_row[row] = origin.get(int(entry), -1)
    return dec, replayed


def _only(stream: pd.DataFrame, dec: Decisions, keep: np.ndarray) -> tuple[pd.DataFrame, Decisions]:
    """The replayed arrivals only (when ``duration`` stopped early), rows renumbered."""
    if keep.all():
        return stream, dec
    new_row = np.full(len(keep) + 1, -1, np.int64)  # index -1 (no origin) stays -1
    new_row[np.flatnonzero(keep)] = np.arange(int(keep.sum()))
    sub = Decisions(dec.hit[keep], new_row[dec.matched_row[keep]], dec.similarity[keep], dec.exact[keep])
    return stream[keep].reset_index(drop=True), sub


def _service_stats(endpoint: str, api_key: Optional[str], timeout_s: float) -> Optional[dict]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{endpoint.rstrip('/')}/v1/cache/stats", headers=headers, timeout=timeout_s)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def run_live(cfg, out: Path) -> dict:
    """Replay ``cfg.stream`` against ``cfg.endpoint`` with ``cfg.concurrency`` client actors."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)
    stream = read_stream_ray(cfg)
    n = len(stream)
    api_key = os.environ.get(cfg.api_key_env) or None
    shards = make_shards(stream, cfg.concurrency)
    actor_cls = ray.remote(num_cpus=CLIENT_NUM_CPUS)(HttpReplayClient)
    clients = [actor_cls.remote(cfg.endpoint, api_key, cfg.timeout_s, cfg.max_retries,
                                cfg.lookup_batch, adaptive_batch=True) for _ in shards]
    try:
        ray.get([c.ready.remote() for c in clients])
        start_at = time.time() + 0.2
        stop_at = start_at + cfg.duration if cfg.duration else None
        parts = ray.get([c.replay.remote(s, start_at, cfg.rate, stop_at, f"live:{i}")
                         for i, (c, s) in enumerate(zip(clients, shards))])
    finally:
        for client in clients:
            ray.kill(client)
    wall_s = max(p["finished_at"] for p in parts) - start_at
    decisions, replayed = collect_decisions(n, parts)
    mode = correctness_mode(stream)
    sub_stream, sub_decisions = _only(stream, decisions, replayed)
    oracle = oracle_hits(sub_stream, mode)
    done = int(replayed.sum())
    path = out / "decisions_live.parquet"
    decisions.to_frame().assign(replayed=replayed).to_parquet(path)
    report = {
        "mode": "live", "endpoint": cfg.endpoint, "stream": cfg.stream, "arrivals": n,
        "replayed": done, "concurrency": len(shards), "sharding": "by (namespace, group)",
        "lookup_batch": cfg.lookup_batch, "rate": cfg.rate, "duration": cfg.duration,
        "correctness": mode, "delta": cfg.delta,
        "oracle_hit_rate": float(oracle.mean()) if mode != "unknown" and done else None,
        "metrics": replay_metrics(sub_stream, sub_decisions, cfg.threshold, mode),
        "throughput_arrivals_per_s": round(done / max(wall_s, 1e-9), 2),
        "wall_seconds": round(wall_s, 3),
        "lookup_latency": latency_summary([s for p in parts for s in p["lookup_s"]]),
        "store_latency": latency_summary([s for p in parts for s in p["store_s"]]),
        "requests": sum(p["requests"] for p in parts),
        "retries": sum(p["retries"] for p in parts),
        "decisions": str(path),
        "service_stats": _service_stats(cfg.endpoint, api_key, cfg.timeout_s),
    }
    m = report["metrics"]
    logger.info("live replay: %d/%d arrivals at %.1f arrivals/s, hit rate %.3f, lookup p95 %s ms",
                done, n, report["throughput_arrivals_per_s"], m["hit_rate"] or 0.0,
                (report["lookup_latency"] or {}).get("p95_ms"))
    return report
