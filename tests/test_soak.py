"""Bounded soak: a steady request rate of mixed lookups, batch lookups, stores (some with a short
TTL) and chat completions over loopback HTTP, against the API served by uvicorn in a thread over an
in-process EngineBackend (no Ray). Memory (RSS and gc-tracked objects) stays flat after warm-up,
capacity holds, nothing fails; latency percentiles are printed and saved as a JSON report.

CI runs 30 s at 25 requests/s (bounded: it stops issuing at twice its duration on a slow machine);
``RAYCACHE_SOAK_SECONDS=600 [RAYCACHE_SOAK_RATE=50] pytest tests/test_soak.py`` runs the long form.
``RAYCACHE_SOAK_REPORT=path.json`` keeps the report. The short soak against Ray Serve
(same driver, RSS of the CacheEngine replica) is in test_faults_service.py.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import httpx
import numpy as np
import pytest

from raycache.cache import LRUEviction, SemanticCache, StaticThreshold
from raycache.service.api import ApiSettings, EngineBackend, create_app, key_digest
from raycache.service.upstream import UpstreamClient
from tests.http_server import serving
from tests.test_cache import DIM, HashingEncoder

SOAK_SECONDS = float(os.environ.get("RAYCACHE_SOAK_SECONDS", "30"))
RATE = float(os.environ.get("RAYCACHE_SOAK_RATE", "25"))  # requests / s, open loop
CAPACITY = 300
KEY = "soak-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_RSS_GROWTH_MB = 4.0  # median of the last third of the samples minus that of the middle third
MAX_OBJECTS_GROWTH = 1000  # gc-tracked objects (after a collection), same windows


# ----------------------------------------------------------------------------- the driver
def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a local process (MiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def live_objects() -> int:
    """gc-tracked objects after a full collection (what a leak of Python objects makes grow)."""
    gc.collect()
    return len(gc.get_objects())


@dataclass
class SoakReport:
    """What a soak measured. Latencies in ms per request kind; ``samples``: one per second of
    (elapsed s, cache entries, memory MiB); ``objects``: (requests sent, gc-tracked objects) at
    quiescent checkpoints (a third, two thirds and all of the requests answered)."""

    seconds: float
    target_rate: float
    planned: int = 0
    requests: int = 0
    by_kind: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    late_starts: int = 0  # requests sent > 100 ms after their slot (the rate was not held)
    latency_ms: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)
    objects: list = field(default_factory=list)
    hits: int = 0

    @property
    def achieved_rate(self) -> float:
        return self.requests / self.seconds

    def summary(self) -> dict:
        out = asdict(self)
        out["achieved_rate"] = round(self.achieved_rate, 1)
        out["errors"] = self.errors[:5]
        out["error_count"] = len(self.errors)
        return out

    def growth(self, column: int) -> float:
        """Median of sample ``column`` over the last third of the run minus that over the middle
        third (the first third is warm-up)."""
        values = [s[column] for s in self.samples]
        n = len(values)
        return float(np.median(values[2 * n // 3:]) - np.median(values[n // 3: 2 * n // 3]))


class Workload:
    """Mixed requests over ``tenants`` namespaces: lookups of a Zipf-popular prompt set (hits and
    misses), 4-prompt batch lookups, stores of new prompts (every 10th with a 2 s TTL), chat
    completions (with ``chat``). Seeded, so a run is repeatable."""

    def __init__(self, seed: int = 0, tenants: int = 8, chat: bool = True):
        self.rng = random.Random(seed)
        self.tenants = [f"tenant-{i}" for i in range(tenants)]
        self.kinds = ["lookup"] * 55 + ["batch"] * 10 + ["store"] * 30 + (["chat"] * 5 if chat else [])
        self.n = 0

    def prompt(self) -> str:
        topic = int(self.rng.paretovariate(1.2)) % 500
        return f"how do I configure feature {topic} on device model {self.rng.randrange(3)}"

    def next(self) -> tuple[str, str, dict]:
        """(kind, path, JSON body) of the next request."""
        self.n += 1
        kind, namespace = self.rng.choice(self.kinds), self.rng.choice(self.tenants)
        if kind == "lookup":
            return kind, "/v1/cache/lookup", {"prompt": self.prompt(), "namespace": namespace}
        if kind == "batch":
            return kind, "/v1/cache/lookup", {"prompts": [self.prompt() for _ in range(4)],
                                              "namespace": namespace,
                                              "history": ["an earlier turn"] if self.n % 3 else None}
        if kind == "store":
            ttl = 2.0 if self.n % 10 == 0 else None
            return kind, "/v1/cache/store", {"prompt": f"{self.prompt()} (variant {self.n})",
                                             "response": f"answer {self.n} " + "x" * 200,
                                             "namespace": namespace, "ttl_s": ttl}
        return kind, "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": self.prompt()}], "namespace": namespace}


async def run_soak(base_url: str, seconds: float, rate: float, workload: Workload,
                   memory: Callable[[], float], count_objects: bool = False,
                   headers: Optional[dict] = None, max_in_flight: int = 32,
                   timeout_s: float = 30.0) -> SoakReport:
    """Send ``rate`` requests/s for ``seconds`` (slot k at start + k/rate, at most ``max_in_flight``
    outstanding; no new request after 2 × ``seconds``) and sample ``/v1/cache/stats`` and
    ``memory()`` (MiB) every second. ``count_objects``: at a third and two thirds of the requests
    and at the end, let the outstanding ones finish and count gc-tracked objects (in-process only)."""
    report = SoakReport(seconds=seconds, target_rate=rate, planned=int(seconds * rate))
    latencies: dict[str, list[float]] = {}
    limit = asyncio.Semaphore(max_in_flight)
    # idle connections are dropped after 2 s, before the server's keep-alive timeout (uvicorn: 5 s);
    # at equal timeouts a request can race the server closing its connection (a ReadError)
    limits = httpx.Limits(max_connections=max_in_flight, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base_url, headers=headers or {}, timeout=timeout_s,
                                 limits=limits) as client:

        async def one(kind: str, path: str, body: dict) -> None:
            async with limit:
                started = time.perf_counter()
                try:
                    response = await client.post(path, json=body)
                except httpx.HTTPError as exc:
                    report.errors.append((kind, type(exc).__name__))
                    return
                latencies.setdefault(kind, []).append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    report.errors.append((kind, response.status_code, response.text[:200]))
                elif kind == "lookup":
                    report.hits += response.json()["hit"]

        async def sampler(start: float) -> None:
            while True:
                stats = (await client.get("/v1/cache/stats")).json()
                report.samples.append((round(time.perf_counter() - start, 2), stats["entries"],
                                       round(memory(), 2)))
                await asyncio.sleep(1.0)

        start = time.perf_counter()
        sampling = asyncio.create_task(sampler(start))
        pending: set[asyncio.Task] = set()  # finished tasks are dropped, not kept
        checkpoints = {report.planned // 3, 2 * report.planned // 3} if count_objects else set()
        for k in range(report.planned):
            if time.perf_counter() - start > 2 * seconds:
                break
            if k in checkpoints:
                await _drain(pending)
                report.objects.append((k, live_objects()))
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.1:
                report.late_starts += 1
            kind, path, body = workload.next()
            report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
            task = asyncio.create_task(one(kind, path, body))
            pending.add(task)
            task.add_done_callback(pending.discard)
            report.requests += 1
        await _drain(pending)
        sampling.cancel()
        if count_objects:
            report.objects.append((report.requests, live_objects()))
        report.seconds = time.perf_counter() - start
    everything = [v for values in latencies.values() for v in values]
    for kind, values in {"all": everything, **latencies}.items():
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        report.latency_ms[kind] = {"p50": round(p50, 2), "p95": round(p95, 2), "p99": round(p99, 2),
                                   "max": round(max(values), 2), "n": len(values)}
    return report


async def _drain(tasks: set) -> None:
    """Wait until every task in ``tasks`` is done (holding no list of them afterwards)."""
    while tasks:
        await asyncio.wait(set(tasks))


def save_report(name: str, report: SoakReport) -> dict:
    """Print the summary (pytest -s shows it) and write it where RAYCACHE_SOAK_REPORT says."""
    summary = report.summary()
    print(f"\n{name}: {json.dumps({k: v for k, v in summary.items() if k != 'samples'})}")
    target = os.environ.get("RAYCACHE_SOAK_REPORT")
    if target:
        path = Path(target)
        existing = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**existing, name: summary}, indent=2))
    return summary


# ----------------------------------------------------------------------------- the in-process service
class EchoUpstream:
    def handle(self, request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["messages"][-1]["content"]
        return httpx.Response(200, json={"id": "up", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": f"re: {prompt}"}}]})


@pytest.fixture(scope="module")
def service():
    """The API (EngineBackend over the hashing encoder, capacity CAPACITY) on a loopback port."""
    cache = SemanticCache(HashingEncoder(), DIM, eviction=LRUEviction(CAPACITY), policy=StaticThreshold(0.95))
    workload = Workload(seed=99)
    for i in range(CAPACITY):  # start full, so the soak measures the steady state (with eviction)
        cache.store(f"{workload.prompt()} (warm-up {i})", "warm-up answer", workload.rng.choice(workload.tenants))
    upstream = UpstreamClient("http://upstream.test/v1", transport=httpx.MockTransport(EchoUpstream().handle))
    app = create_app(EngineBackend(cache), ApiSettings(api_key_sha256=key_digest(KEY)), upstream)
    with serving(app) as url:
        yield url, cache


def test_soak_in_process_memory_flat_capacity_held_no_errors(service):
    base_url, cache = service
    report = asyncio.run(run_soak(base_url, SOAK_SECONDS, RATE, Workload(seed=1), rss_mb,
                                  count_objects=True, headers=AUTH))
    summary = save_report("in_process", report)

    assert report.errors == [] and report.requests >= 0.5 * report.planned
    assert set(report.by_kind) == {"lookup", "batch", "store", "chat"} and report.hits > 0
    assert CAPACITY * 0.8 <= min(s[1] for s in report.samples) <= max(s[1] for s in report.samples) <= CAPACITY
    stats = cache.stats()
    assert stats["evictions"] > 0 and stats["expirations"] > 0
    assert report.growth(2) <= MAX_RSS_GROWTH_MB, summary["samples"]
    (first, first_objects), (last, last_objects) = report.objects[0], report.objects[-1]
    assert last_objects - first_objects <= MAX_OBJECTS_GROWTH, report.objects


def test_an_evicting_hnsw_cache_stays_bounded():
    """5,000 stores through a 100-entry HNSW cache: the graph holds O(capacity + compaction slack)
    vectors, not one per store (tombstones are compacted)."""
    cache = SemanticCache(None, DIM, index="hnsw", eviction=LRUEviction(100), policy=StaticThreshold(0.9))
    rng = np.random.default_rng(0)
    for i in range(5_000):
        cache.store(f"prompt {i}", "r", vector=rng.standard_normal(DIM).astype(np.float32))
    (index,) = cache._indexes.values()  # one scope
    assert len(cache) == 100 and index._index.ntotal < 2_000


def test_hnsw_finds_a_live_entry_behind_evicted_neighbours():
    """100 entries near the query are evicted; the one live entry above the threshold must hit."""
    rng = np.random.default_rng(0)
    query = rng.standard_normal(DIM).astype(np.float32)
    query /= np.linalg.norm(query)

    def near(spread: float) -> np.ndarray:
        return query + spread * rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)

    for kind in ("flat", "hnsw"):
        cache = SemanticCache(None, DIM, index=kind, eviction=LRUEviction(100), policy=StaticThreshold(0.5))
        for i in range(100):
            cache.store(f"evicted {i}", "old", vector=near(0.1))
        cache.store("live", "LIVE", vector=near(1.0))
        for i in range(99):
            cache.store(f"unrelated {i}", "far", vector=rng.standard_normal(DIM).astype(np.float32))
        assert cache.check("query", vector=query).response == "LIVE", kind
