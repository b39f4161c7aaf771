"""The service on a local Ray cluster, over real HTTP: every route, the chat proxy against an
in-test OpenAI-compatible upstream, paraphrase hits, scopes, eviction, TTL, restart, bad input and
the API key. Serve starts once for the module (``raycache serve``'s own ``run``)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from raycache.config import CacheConfig, ServeConfig
from raycache.service.app import APP_NAME, build_app, free_port, run

pytestmark = pytest.mark.ray

KEY_ENV = "RAYCACHE_TEST_SERVICE_KEY"
KEY = "service-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
CAPACITY = 8
FRANCE = "What is the capital of France?"


# ----------------------------------------------------------------------------- in-test upstream
def upstream_app(calls: list) -> FastAPI:
    """A minimal OpenAI-compatible chat server; the last user message steers failures."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        calls.append(body)
        if "FAIL" in prompt:
            return JSONResponse({"error": {"message": "model crashed"}}, status_code=500)
        if "SLOW" in prompt:
            await asyncio.sleep(2.5)
        if "PAUSE" in prompt:
            await asyncio.sleep(0.5)
        if body.get("stream"):
            async def events():
                for token in ("Hel", "lo"):
                    yield f'data: {{"choices": [{{"index": 0, "delta": {{"content": "{token}"}}}}]}}\n\n'
                yield 'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": "up", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": f"LLM says: {prompt}"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}

    return app


@pytest.fixture(scope="module")
def upstream():
    calls: list = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(upstream_app(calls), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", calls
    server.should_exit = True
    thread.join(timeout=10)


# ----------------------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def service(upstream, tmp_path_factory):
    import ray
    from ray import serve

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.environ["RAY_TMPDIR"])
    previous_key = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    cfg = ServeConfig(
        port=free_port(), blocking=False, api_key_env=KEY_ENV, upstream=upstream[0],
        upstream_timeout_s=1.0, max_request_bytes=4096, max_prompt_chars=300, max_batch_prompts=8,
        embedder_min_replicas=1, embedder_max_replicas=1,
        cache=CacheConfig(capacity=CAPACITY, threshold=0.85, persist_interval_s=3600,
                          persist_path=str(tmp_path_factory.mktemp("svc") / "cache.npz")))
    try:
        summary = run(cfg)
        with httpx.Client(base_url=summary["url"], timeout=30) as client:
            yield client, cfg
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
        if previous_key is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = previous_key


def lookup(client, prompt, **fields):
    response = client.post("/v1/cache/lookup", json={"prompt": prompt, **fields}, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def store(client, prompt, response, **fields) -> int:
    reply = client.post("/v1/cache/store", json={"prompt": prompt, "response": response, **fields},
                        headers=AUTH)
    assert reply.status_code == 200, reply.text
    return reply.json()["entry_id"]


def chat(client, prompt, earlier=(), namespace="chat", **extra):
    messages = [{"role": "system", "content": "Answer briefly."}, *earlier,
                {"role": "user", "content": prompt}]
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, **extra},
                       headers={**AUTH, "x-raycache-namespace": namespace})


# ----------------------------------------------------------------------------- tests
def test_health_docs_and_api_key(service):
    client, _ = service
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/v1/cache/stats").status_code == 401
    assert client.get("/v1/cache/stats", headers={"x-api-key": "wrong"}).status_code == 401
    assert client.get("/v1/cache/stats", headers={"x-api-key": KEY}).status_code == 200
    assert client.get("/docs").status_code == 401
    assert "swagger" in client.get("/docs", headers=AUTH).text.lower()
    paths = client.get("/openapi.json", headers=AUTH).json()["paths"]
    assert {"/v1/cache/lookup", "/v1/cache/store", "/v1/chat/completions", "/v1/cache/stats",
            "/v1/cache", "/healthz"} <= set(paths)


def test_store_then_exact_and_paraphrase_hits(service):
    client, _ = service
    entry_id = store(client, FRANCE, "Paris.", namespace="geo")
    exact = lookup(client, "What is the capital of  France? ", namespace="geo")
    assert exact["hit"] and exact["exact"] and exact["entry_id"] == entry_id
    folded = lookup(client, "what is the capital of france?", namespace="geo")  # case: not exact
    assert folded["hit"] and not folded["exact"] and folded["entry_id"] == entry_id
    paraphrase = lookup(client, "Which city is the capital of France?", namespace="geo")
    assert paraphrase["hit"] and not paraphrase["exact"] and paraphrase["response"] == "Paris."
    assert 0.85 <= paraphrase["similarity"] < 1
    assert not lookup(client, "What is the capital of Germany?", namespace="geo")["hit"]
    batch = client.post("/v1/cache/lookup", headers=AUTH, json={
        "prompts": ["How do I bake sourdough bread?", "Which city is the capital of France?"],
        "namespace": "geo"}).json()["results"]
    assert [r["hit"] for r in batch] == [False, True]


def test_no_hit_across_namespaces(service):
    client, _ = service
    store(client, FRANCE, "Paris (tenant a).", namespace="tenant-a")
    assert lookup(client, FRANCE, namespace="tenant-a")["hit"]
    assert not lookup(client, FRANCE, namespace="tenant-b")["hit"]
    assert not lookup(client, "Which city is the capital of France?", namespace="tenant-b")["hit"]


def test_chat_miss_goes_upstream_then_paraphrase_hits(service, upstream):
    client, _ = service
    calls = upstream[1]
    before = len(calls)
    first = chat(client, FRANCE)
    assert first.status_code == 200 and first.headers["x-raycache"] == "miss"
    assert first.json()["choices"][0]["message"]["content"] == f"LLM says: {FRANCE}"
    assert first.json()["raycache"]["stored"] is True and len(calls) == before + 1
    hit = chat(client, "Which city is the capital of France?")
    assert hit.status_code == 200 and hit.headers["x-raycache"] == "hit"
    body = hit.json()
    assert body["choices"][0]["message"]["content"] == f"LLM says: {FRANCE}"
    assert body["raycache"]["hit"] is True and body["raycache"]["matched_prompt"] == FRANCE
    assert len(calls) == before + 1
    assert chat(client, FRANCE, namespace="other-tenant").headers["x-raycache"] == "miss"


def test_chat_never_hits_across_conversations(service, upstream):
    client, _ = service
    python = [{"role": "user", "content": "Tell me about Python."},
              {"role": "assistant", "content": "Python is a programming language."}]
    snakes = [{"role": "user", "content": "Tell me about pythons, the snakes."},
              {"role": "assistant", "content": "Pythons are large constrictors."}]
    assert chat(client, "What are its types?", python).headers["x-raycache"] == "miss"
    assert chat(client, "What are its types?", snakes).headers["x-raycache"] == "miss"
    assert chat(client, "What are its types?", python).headers["x-raycache"] == "hit"


def test_upstream_error_and_timeout_store_nothing(service):
    client, _ = service
    stores = client.get("/v1/cache/stats", headers=AUTH).json()["stores"]
    failed = chat(client, "please FAIL now")
    assert failed.status_code == 502 and "upstream" in failed.json()["error"]["message"]
    slow = chat(client, "please be SLOW")
    assert slow.status_code == 504 and "timed out" in slow.json()["error"]["message"]
    assert client.get("/v1/cache/stats", headers=AUTH).json()["stores"] == stores


def test_streaming_miss_streams_through_and_is_stored_then_replayed(service, upstream):
    client, _ = service
    stores = client.get("/v1/cache/stats", headers=AUTH).json()["stores"]
    request = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "Say hello"}]}
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json=request) as r:
        assert r.status_code == 200 and r.headers["x-raycache"] == "miss"
        text = "".join(r.iter_text())
    assert '"Hel"' in text and text.endswith("data: [DONE]\n\n")
    assert upstream[1][-1]["stream"] is True
    calls = len(upstream[1])
    assert client.get("/v1/cache/stats", headers=AUTH).json()["stores"] == stores + 1
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json=request) as r:
        assert r.status_code == 200 and r.headers["x-raycache"] == "hit"
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(upstream[1]) == calls
    replayed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert replayed == "Hello"


@pytest.mark.parametrize("path, body, status", [
    ("/v1/cache/lookup", b'{"prompt": ', 400),
    ("/v1/cache/lookup", b'{"namespace": "x"}', 422),
    ("/v1/cache/lookup", b'{"prompt": 42}', 422),
    ("/v1/cache/lookup", b'{"prompt": "' + b"x" * 301 + b'"}', 422),
    ("/v1/cache/lookup", b'{"prompts": ' + str(["p"] * 9).replace("'", '"').encode() + b"}", 422),
    ("/v1/cache/store", b'{"prompt": "a", "response": "' + b"x" * 5000 + b'"}', 413),
    ("/v1/cache/store", b'{"prompt": "a", "response": "b", "ttl_s": -1}', 422),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": []}', 422),
])
def test_bad_inputs_get_4xx_not_500(service, path, body, status):
    client, _ = service
    response = client.post(path, content=body, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"] and "Traceback" not in response.text


def test_batch_store_and_one_embedding_per_miss(service):
    client, _ = service
    prompts = ["Which ocean is the largest?", "How tall is Mount Everest?", "Who wrote Hamlet?"]
    reply = client.post("/v1/cache/store", headers=AUTH, json={
        "prompts": prompts, "responses": ["Pacific.", "8,849 m.", "Shakespeare."], "namespace": "batch"})
    assert reply.status_code == 200, reply.text
    ids = reply.json()["entry_ids"]
    assert len(set(ids)) == 3 and lookup(client, "Who wrote Hamlet?", namespace="batch")["entry_id"] == ids[2]
    bad = client.post("/v1/cache/store", headers=AUTH, json={"prompts": prompts, "responses": ["x"]})
    assert bad.status_code == 422 and "1 responses for 3 prompts" in bad.json()["error"]["message"]
    reused = client.get("/v1/cache/stats", headers=AUTH).json()["vectors_reused"]
    assert not lookup(client, "What is the longest river in Africa?", namespace="batch")["hit"]
    store(client, "What is the longest river in Africa?", "The Nile.", namespace="batch")
    assert client.get("/v1/cache/stats", headers=AUTH).json()["vectors_reused"] == reused + 1


def test_concurrent_identical_chat_misses_make_one_upstream_call(service, upstream):
    client, _ = service
    calls = upstream[1]
    before = len(calls)
    chat(client, "Seed the scope, please.", namespace="flight")
    body = {"model": "tiny", "messages": [{"role": "system", "content": "Answer briefly."},
                                          {"role": "user", "content": "PAUSE: what is the speed of light?"}]}

    async def burst():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30) as aclient:
            return await asyncio.gather(*(aclient.post(
                "/v1/chat/completions", json=body, headers={**AUTH, "x-raycache-namespace": "flight"})
                for _ in range(6)))

    replies = asyncio.run(burst())
    assert [r.status_code for r in replies] == [200] * 6
    assert sorted(r.headers["x-raycache"] for r in replies) == ["hit"] * 5 + ["miss"]
    assert len(calls) == before + 2  # the seed and one call for the six


def test_ttl_expiry(service):
    client, _ = service
    store(client, "A short-lived fact about tides.", "Tides follow the moon.", namespace="ttl", ttl_s=3)
    assert lookup(client, "A short-lived fact about tides.", namespace="ttl")["hit"]
    time.sleep(3.2)
    assert not lookup(client, "A short-lived fact about tides.", namespace="ttl")["hit"]
    assert client.get("/v1/cache/stats", headers=AUTH).json()["expirations"] >= 1


def test_stats_and_delete(service):
    client, _ = service
    stats = client.get("/v1/cache/stats", headers=AUTH).json()
    assert stats["lookups"] == stats["hits"] + stats["misses"] and stats["hits"] > 0
    assert stats["lookup_ms"]["p50"] > 0 and stats["lookup_ms"]["p99"] >= stats["lookup_ms"]["p95"]
    store(client, "Delete me please.", "x", namespace="doomed")
    store(client, "Keep me please.", "y", namespace="kept")
    removed = client.delete("/v1/cache", params={"namespace": "doomed"}, headers=AUTH).json()
    assert removed == {"removed": 1, "namespace": "doomed"}
    assert not lookup(client, "Delete me please.", namespace="doomed")["hit"]
    assert lookup(client, "Keep me please.", namespace="kept")["hit"]


def test_lru_eviction_at_capacity(service):
    client, _ = service
    client.delete("/v1/cache", headers=AUTH)
    evictions = client.get("/v1/cache/stats", headers=AUTH).json()["evictions"]
    prompts = [f"Question number {i}: what is {i} squared?" for i in range(CAPACITY + 1)]
    for p in prompts[:CAPACITY]:
        store(client, p, p.upper(), namespace="lru")
    assert lookup(client, prompts[0], namespace="lru")["hit"]  # refresh: prompts[1] is now LRU
    store(client, prompts[CAPACITY], "last", namespace="lru")
    stats = client.get("/v1/cache/stats", headers=AUTH).json()
    assert stats["entries"] == CAPACITY and stats["evictions"] == evictions + 1
    assert lookup(client, prompts[0], namespace="lru")["exact"]
    assert not lookup(client, prompts[1], namespace="lru")["exact"]
    assert lookup(client, prompts[CAPACITY], namespace="lru")["hit"]


def test_restart_reloads_the_cache(service):
    """Deleting the app stops the CacheEngine (it saves on shutdown); a new one loads the file."""
    from ray import serve

    client, cfg = service
    entry_id = store(client, "Which river flows through Vienna?", "The Danube.", namespace="persist")
    serve.delete(APP_NAME)
    assert os.path.exists(cfg.cache.persist_path)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    found = lookup(client, "Which river flows through Vienna?", namespace="persist")
    assert found["hit"] and found["entry_id"] == entry_id and found["response"] == "The Danube."
    assert lookup(client, "What river runs through Vienna?", namespace="persist")["hit"]
    persistence = client.get("/v1/cache/stats", headers=AUTH).json()["persistence"]
    assert persistence["loaded_entries"] >= 1 and persistence["load_error"] is None
