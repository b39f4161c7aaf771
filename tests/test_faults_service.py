"""Faults on a local Ray cluster, over real HTTP against the Serve service (one start for the
module): the API key on every served route, a short soak, an Embedder replica killed while a stream
is replayed, the CacheEngine replica killed between snapshots, and no key in any Ray/Serve log.
Plus, in process, an upstream that answers garbage. Tests run in file order: the log check last."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from raycache.cache import SemanticCache, StaticThreshold
from raycache.config import CacheConfig, ServeConfig
from raycache.service.api import ApiSettings, EngineBackend, create_app
from raycache.service.app import APP_NAME, free_port, run
from raycache.service.upstream import UpstreamClient
from raycache.simulation.live import HttpReplayClient, collect_decisions, make_shards
from tests.test_cache import DIM, HashingEncoder
from tests.test_soak import Workload, rss_mb, run_soak, save_report

KEY_ENV = "RAYCACHE_TEST_FAULTS_KEY"
KEY = "faults-KEY-3b8e51d2c7"
AUTH = {"authorization": f"Bearer {KEY}"}
THRESHOLD = 0.85
CAPACITY = 25
PERSIST_S = 2.0
MARGIN = 1e-3  # similarities this close to the threshold may flip with batching noise (~1e-6)


# ----------------------------------------------------------------------------- fixtures, helpers
@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    from ray import serve

    previous_key = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    cfg = ServeConfig(
        port=free_port(), blocking=False, api_key_env=KEY_ENV, embedder_min_replicas=1,
        embedder_max_replicas=1, max_prompt_chars=500,
        cache=CacheConfig(capacity=CAPACITY, threshold=THRESHOLD, persist_interval_s=PERSIST_S,
                          persist_path=str(tmp_path_factory.mktemp("faults") / "cache.npz")))
    try:
        url = run(cfg)["url"]
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
            yield client, cfg
    finally:
        serve.shutdown()
        if previous_key is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = previous_key


def replica(deployment: str):
    """(name, actor handle) of the one live replica of ``deployment`` (waits while Serve swaps)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment}#"
    deadline = time.time() + 120
    while True:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(prefix)]
        if len(names) == 1:
            return names[0], ray.get_actor(names[0], namespace="serve")
        assert time.time() < deadline, f"{deployment} replicas: {names}"
        time.sleep(0.5)


def replica_pid(deployment: str) -> int:
    import ray

    _, actor = replica(deployment)
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))


def kill(deployment: str) -> str:
    """Kill the replica as a crash would (no shutdown hook); Serve starts a new one."""
    import ray

    name, actor = replica(deployment)
    ray.kill(actor, no_restart=False)
    return name


def lookup_until_answered(client: httpx.Client, prompts: list[str], namespace: str) -> tuple[list[dict], int]:
    """Batch lookup, retried on 5xx (a replica restarting) for up to 120 s -> (results, retries)."""
    deadline, retries = time.time() + 120, 0
    while True:
        reply = client.post("/v1/cache/lookup", json={"prompts": prompts, "namespace": namespace})
        if reply.status_code == 200:
            return reply.json()["results"], retries
        assert reply.status_code >= 500 and time.time() < deadline, reply.text
        retries += 1
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stream():
    from raycache import workload

    prompts = workload.generate_prompts(seed=0)
    pool = prompts[(prompts["split"] == "test") & (prompts["domain"] == prompts["domain"].iloc[0])]
    return workload.generate_stream(pool, 60, seed=5)


# ----------------------------------------------------------------------------- tests
def test_api_key_guards_every_served_route(service):
    client, _ = service
    schema = client.get("/openapi.json").json()
    calls = [(method.upper(), path) for path, item in schema["paths"].items() for method in item]
    assert len(calls) >= 6
    with httpx.Client(base_url=str(client.base_url), timeout=60) as anonymous:
        for method, path in calls + [("GET", "/openapi.json"), ("GET", "/docs")]:
            for headers in ({}, {"authorization": f"Bearer {KEY}-wrong"}, {"x-api-key": KEY[:-1]}):
                status = anonymous.request(method, path, headers=headers).status_code
                assert status == (200 if path == "/healthz" else 401), (method, path, headers)


def test_short_soak_against_serve(service):
    """Steady mixed load through Serve (real encoder): no errors, capacity held, RSS of the
    CacheEngine replica reported; p99 latency printed."""
    client, _ = service
    pid = replica_pid("CacheEngine")
    report = asyncio.run(run_soak(str(client.base_url), 12, 10, Workload(seed=2, chat=False),
                                  lambda: rss_mb(pid), headers=AUTH, timeout_s=120))
    summary = save_report("serve", report)
    assert report.errors == [] and report.requests >= 60
    assert max(s[1] for s in report.samples) <= CAPACITY
    assert client.get("/v1/cache/stats").json()["evictions"] > 0
    assert report.growth(2) <= 25.0, summary["samples"]  # MiB; a short run: a coarse bound
    client.delete("/v1/cache")


def _replay(client: httpx.Client, shard: dict, rate: float, kill_after: int | None = None) -> dict:
    """Replay ``shard`` with the live-simulation client (retries with backoff); with
    ``kill_after``, kill the Embedder replica once that many requests were sent."""
    replayer = HttpReplayClient(str(client.base_url), KEY, timeout_s=120, max_retries=10, lookup_batch=1)
    result: dict = {}

    def replay() -> None:
        try:
            result.update(replayer.replay(shard, time.time(), rate))
        except Exception as exc:  # reported by the assertion below
            result["error"] = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=replay)
    worker.start()
    if kill_after is not None:
        while replayer.requests < kill_after and worker.is_alive():
            time.sleep(0.02)
        assert worker.is_alive(), "the replay ended before the fault"
        result["killed"] = kill("Embedder")
        result["killed_at_request"] = replayer.requests
    worker.join(timeout=300)
    assert not worker.is_alive() and "error" not in result, result.get("error")
    replayer.close()
    return result


def test_killing_an_embedder_replica_mid_stream_changes_no_response(service, stream):
    """The same stream twice from an empty namespace: undisturbed, then with the Embedder replica
    killed a third of the way in. Every arrival gets the same decision and the same matched entry
    (so the same response); the stall and retries are reported."""
    client, _ = service
    shard = make_shards(stream.assign(namespace="replay"), 1)[0]
    baseline = _replay(client, shard, rate=20)
    client.delete("/v1/cache", params={"namespace": "replay"})
    faulty = _replay(client, shard, rate=20, kill_after=len(stream) // 3)

    n = len(stream)
    expected, _ = collect_decisions(n, [baseline])
    got, replayed = collect_decisions(n, [faulty])
    assert replayed.all()
    assert replica("Embedder")[0] != faulty["killed"]  # Serve replaced the replica
    near = (np.abs(expected.similarity - THRESHOLD) < MARGIN) | (np.abs(got.similarity - THRESHOLD) < MARGIN)
    assert near.sum() <= 2
    same = ~near
    np.testing.assert_array_equal(got.hit[same], expected.hit[same])
    np.testing.assert_array_equal(got.matched_row[same], expected.matched_row[same])
    responses = stream["response"].to_numpy()
    hits = np.flatnonzero(got.hit & same & (got.matched_row >= 0))
    assert len(hits) >= 3 and (responses[got.matched_row[hits]] == responses[expected.matched_row[hits]]).all()
    print(f"\nembedder killed at request {faulty['killed_at_request']}: {faulty['retries']} client retries, "
          f"slowest lookup {max(faulty['lookup_s']):.1f} s (undisturbed {max(baseline['lookup_s']):.2f} s), "
          f"{int(got.hit.sum())} hits, {int(near.sum())} arrivals within {MARGIN} of the threshold")


def test_killing_the_cache_engine_restores_the_last_snapshot(service):
    """Store A, wait for a periodic snapshot, store B, kill the CacheEngine replica at once. The
    new replica loads the snapshot: every A entry is back (same ids and responses); at most the B
    inserts (those since the last snapshot, under one period) are lost, and the count is reported."""
    client, cfg = service
    client.delete("/v1/cache")
    a = [f"Which river flows through city number {i}?" for i in range(10)]
    b = [f"What is the population of town number {i}?" for i in range(5)]

    def store(prompt: str) -> int:
        reply = client.post("/v1/cache/store", json={"prompt": prompt, "response": f"answer: {prompt}",
                                                     "namespace": "persist"})
        assert reply.status_code == 200, reply.text
        return reply.json()["entry_id"]

    ids_a = [store(p) for p in a]
    stored_a = time.time()
    deadline = stored_a + 30
    while (client.get("/v1/cache/stats").json()["persistence"]["last_saved_at"] or 0) < stored_a:
        assert time.time() < deadline, "no periodic snapshot within 30 s"
        time.sleep(0.2)
    for prompt in b:
        store(prompt)
    killed_at = time.time()
    killed = kill("CacheEngine")

    found, retries = lookup_until_answered(client, a + b, "persist")
    back_after = time.time() - killed_at
    assert replica("CacheEngine")[0] != killed
    assert all(r["hit"] and r["exact"] for r in found[:len(a)])
    assert [r["entry_id"] for r in found[:len(a)]] == ids_a
    assert [r["response"] for r in found[:len(a)]] == [f"answer: {p}" for p in a]
    lost = [p for p, r in zip(b, found[len(a):]) if not r["exact"]]
    persistence = client.get("/v1/cache/stats").json()["persistence"]
    assert persistence["loaded_entries"] == len(a) + len(b) - len(lost) and persistence["load_error"] is None
    assert len(lost) <= len(b)
    print(f"\ncache engine killed {killed_at - stored_a:.1f} s after the A inserts: back after "
          f"{back_after:.1f} s ({retries} retries) with {persistence['loaded_entries']} entries; lost "
          f"{len(lost)} of the {len(b)} inserts made since the last snapshot "
          f"(period {cfg.cache.persist_interval_s} s)")


def test_no_key_in_any_ray_or_serve_log(service):
    """After every test above (right and wrong keys on every route), no log file of the Ray
    session holds the API key; the Serve replica logs did record the requests."""
    client, _ = service
    client.get("/v1/cache/stats", headers={"x-api-key": KEY + "-near-miss"})  # a 401 carrying the key
    logs = Path(os.environ["RAY_TMPDIR"]) / "session_latest" / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    serve_logs = b"".join(p.read_bytes() for p in files if p.parent.name == "serve")
    assert b"/v1/cache/lookup" in serve_logs  # the request logs are there to search
    leaking = [str(p) for p in files if KEY.encode() in p.read_bytes()]
    assert leaking == []


# ----------------------------------------------------------------------------- upstream garbage
class GarbageUpstream:
    """An OpenAI-compatible endpoint whose answer the last user message chooses."""

    ANSWERS = {
        "invalid json": httpx.Response(200, content=b"{not json"),
        "json list": httpx.Response(200, json=[1, 2]),
        "nan": httpx.Response(200, content=b'{"choices": [{"message": {"content": "x"}, "logprob": NaN}]}'),
        "surrogate": httpx.Response(200, content=b'{"choices": [{"finish_reason": "stop", '
                                                  b'"message": {"role": "assistant", "content": "\\ud800"}}]}'),
        "html error": httpx.Response(503, text="<html>" + "x" * 5000 + "</html>"),
        "no choices": httpx.Response(200, json={"id": "x", "choices": []}),
    }

    def handle(self, request: httpx.Request) -> httpx.Response:
        import json

        prompt = json.loads(request.content)["messages"][-1]["content"]
        answer = self.ANSWERS[prompt]
        return httpx.Response(answer.status_code, content=answer.content, headers=answer.headers)


@pytest.mark.parametrize("prompt, status", [("invalid json", 502), ("json list", 502), ("nan", 502),
                                            ("surrogate", 502), ("html error", 502), ("no choices", 200)])
def test_an_upstream_answering_garbage_gets_a_clear_502_and_nothing_is_stored(prompt, status):
    """Errors and timeouts are in test_service*.py; here the upstream answers but with garbage."""
    from fastapi.testclient import TestClient

    cache = SemanticCache(HashingEncoder(), DIM, policy=StaticThreshold(0.9))
    upstream = UpstreamClient("http://upstream.test/v1", transport=httpx.MockTransport(GarbageUpstream().handle))
    api = TestClient(create_app(EngineBackend(cache), ApiSettings(), upstream), raise_server_exceptions=False)
    reply = api.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": prompt}]})
    assert reply.status_code == status, reply.text
    if status == 502:
        assert reply.json()["error"]["type"] == "upstream_error" and len(reply.text) < 1000
    else:
        assert reply.json()["raycache"]["stored"] is False
    assert len(cache) == 0 and cache.stats()["stores"] == 0
