"""The request path does each piece of work once (issue 14, part 1), in process (no Ray):

* one embedding per prompt: the store after a missed lookup (chat proxy, cache-aside client, the
  CacheEngine replica) reuses the lookup's vector;
* the batch form of ``POST /v1/cache/store`` (``prompts`` + ``responses``): one embedding call,
  atomic, every bad batch a clear 4xx that stores nothing;
* concurrent identical chat misses make one upstream call (single flight);
* cache work runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from raycache.cache import SemanticCache, StaticThreshold
from raycache.service.api import ApiSettings, EngineBackend, create_app
from raycache.service.coalesce import SingleFlight, VectorMemo
from raycache.service.upstream import UpstreamClient
from tests.test_cache import DIM, HashingEncoder

LIMITS = dict(max_request_bytes=8192, max_prompt_chars=200, max_batch_prompts=4)


class CountingEmbedder:
    """The Serve embedder's contract (async texts -> (vectors, tail keys)); counts calls and texts."""

    def __init__(self) -> None:
        self.encoder = HashingEncoder()
        self.calls: list[list[str]] = []

    async def __call__(self, texts):
        self.calls.append(list(texts))
        return self.encoder.encode(texts), [""] * len(texts)

    @property
    def texts(self) -> list[str]:
        return [t for call in self.calls for t in call]


def answer(prompt: str) -> dict:
    return {"id": "up", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"answer to: {prompt}"}}]}


class SlowUpstream:
    """An async OpenAI-compatible endpoint that takes ``delay_s`` per call; counts calls."""

    def __init__(self, delay_s: float = 0.3, status: int = 200) -> None:
        self.delay_s, self.status = delay_s, status
        self.prompts: list[str] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["messages"][-1]["content"]
        self.prompts.append(prompt)
        await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "model crashed"}})
        return httpx.Response(200, json=answer(prompt))

    def client(self) -> UpstreamClient:
        return UpstreamClient("http://upstream.test/v1", transport=httpx.MockTransport(self.handle))


def build(embed=None, upstream=None, cache=None, **limits):
    cache = SemanticCache(None, DIM, policy=StaticThreshold(0.9)) if cache is None else cache
    embed = embed or CountingEmbedder()
    backend = EngineBackend(cache, embed=embed)
    app = create_app(backend, ApiSettings(**{**LIMITS, **limits}), upstream)
    return app, backend, cache, embed


def chat_body(prompt: str, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], **extra}


# ----------------------------------------------------------------------------- one embedding
def test_a_chat_miss_embeds_its_prompt_once():
    upstream = SlowUpstream(delay_s=0)
    app, backend, cache, embed = build(upstream=upstream.client())
    api = TestClient(app)
    first = api.post("/v1/chat/completions", json=chat_body("how do I reset my router password"))
    assert first.headers["x-raycache"] == "miss" and first.json()["raycache"]["stored"]
    embed.calls.clear()  # the scope now has an entry: a miss embeds at lookup time
    miss = api.post("/v1/chat/completions", json=chat_body("what is the capital of france"))
    assert miss.headers["x-raycache"] == "miss" and miss.json()["raycache"]["stored"]
    assert embed.texts == ["what is the capital of france"]  # lookup only; the store reused it
    hit = api.post("/v1/chat/completions", json=chat_body("what is the capital of france please"))
    assert hit.headers["x-raycache"] == "hit"
    assert len(upstream.prompts) == 2 and len(cache) == 2 and backend.memo.reused >= 1


def test_cache_aside_lookup_then_store_embeds_once_single_and_batched():
    app, backend, cache, embed = build()
    api = TestClient(app)
    assert api.post("/v1/cache/store", json={"prompt": "seed entry about routers", "response": "s"}).status_code == 200
    embed.calls.clear()
    prompt = "how do I bake sourdough bread"
    assert not api.post("/v1/cache/lookup", json={"prompt": prompt}).json()["hit"]
    assert api.post("/v1/cache/store", json={"prompt": prompt, "response": "Slowly."}).status_code == 200
    assert embed.calls == [[prompt]]

    embed.calls.clear()
    batch = ["first new question", "second new question", "third new question"]
    results = api.post("/v1/cache/lookup", json={"prompts": batch}).json()["results"]
    assert [r["hit"] for r in results] == [False] * 3
    stored = api.post("/v1/cache/store", json={"prompts": batch, "responses": ["1", "2", "3"]})
    assert stored.status_code == 200, stored.text
    assert embed.calls == [batch]  # one call for the lookup, none for the store
    assert [api.post("/v1/cache/lookup", json={"prompt": p}).json()["response"] for p in batch] == ["1", "2", "3"]
    timings = api.get("/v1/cache/stats").json()["request_path_ms"]
    assert set(timings) == {"embed_call", "lookup_call", "store_call"}
    assert timings["embed_call"]["count"] == 3 and timings["store_call"]["count"] == 3  # seed, single, batch
    assert timings["lookup_call"]["count"] == 5 and timings["lookup_call"]["p50"] >= 0


def test_the_engine_replica_embeds_a_looked_up_prompt_once():
    from tests.test_service_engine import FakeEmbedderHandle, start_engine
    import tempfile

    engine = start_engine(tempfile.mkdtemp() + "/c.npz")
    calls = []
    handle = FakeEmbedderHandle()
    inner = handle.embed_with_tails.fn
    engine.backend._embed = lambda texts: _count(calls, inner, texts)
    asyncio.run(engine.store("seed prompt about modems", "s", "n"))
    calls.clear()
    prompt = "how do I reset my router password"
    assert not asyncio.run(engine.lookup([prompt], "n"))[0]["hit"]
    ids = asyncio.run(engine.store_batch([prompt, "another question"], ["R", "A"], "n"))
    assert calls == [[prompt], ["another question"]] and len(set(ids)) == 2
    assert asyncio.run(engine.lookup(["another question"], "n"))[0]["response"] == "A"
    engine.saver.stop(final_save=False)


async def _count(calls, inner, texts):
    calls.append(list(texts))
    return inner(texts)


def test_vector_memo_is_bounded_and_copies_rows():
    memo = VectorMemo(capacity=2)
    batch = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM)
    memo.put(["a", "b", "c"], batch, ["", "t", ""])
    assert len(memo) == 2 and memo.get("a") is None
    vector, tail = memo.get("b")
    assert tail == "t" and np.array_equal(vector, batch[1]) and vector.base is None
    memo.put(["d"], batch[:1], None)
    assert memo.get("c") is None and memo.get("d")[1] is None  # b was used more recently than c
    assert VectorMemo(0).get("x") is None


# ----------------------------------------------------------------------------- batch store
def test_batch_store_answers_ids_in_order_with_ttl_history_and_namespace():
    clock = [1000.0]
    cache = SemanticCache(None, DIM, policy=StaticThreshold(0.9), clock=lambda: clock[0])
    app, backend, cache, embed = build(cache=cache)
    api = TestClient(app)
    history = [{"role": "user", "content": "tell me about routers"}]
    reply = api.post("/v1/cache/store", json={"prompts": ["reset it", "update it"], "responses": ["R", "U"],
                                              "namespace": "t", "history": history, "ttl_s": 60})
    ids = reply.json()["entry_ids"]
    assert reply.status_code == 200 and len(ids) == 2 and ids[0] < ids[1] and len(embed.calls) == 1
    found = api.post("/v1/cache/lookup", json={"prompt": "update it", "namespace": "t", "history": history}).json()
    assert found["hit"] and found["entry_id"] == ids[1]
    assert not api.post("/v1/cache/lookup", json={"prompt": "update it", "namespace": "t"}).json()["hit"]
    assert not api.post("/v1/cache/lookup", json={"prompt": "update it", "history": history}).json()["hit"]
    clock[0] += 61
    assert len(cache) == 0  # the batch's ttl_s applies to each entry


@pytest.mark.parametrize("body, status, text", [
    ({"prompts": ["a", "b"], "responses": ["x"]}, 422, "1 responses for 2 prompts"),
    ({"prompts": ["a", "b", "c", "d", "e"], "responses": list("vwxyz")}, 422, "limit is 4"),
    ({"prompts": [], "responses": []}, 422, "empty"),
    ({"prompts": ["a"]}, 422, "'responses' is missing"),
    ({"responses": ["a"]}, 422, "'prompts' is missing"),
    ({"prompt": "a", "response": "b", "prompts": ["c"], "responses": ["d"]}, 422, "exactly one"),
    ({"prompt": "a", "responses": ["d"]}, 422, "exactly one"),
    ({}, 422, "exactly one"),
    ({"prompts": ["fine", "  "], "responses": ["x", "y"]}, 422, "prompts[1] must not be empty"),
    ({"prompts": ["fine", "x" * 201], "responses": ["x", "y"]}, 422, "prompts[1] is 201 characters"),
    ({"prompts": ["a", "b"], "responses": ["x", 5]}, 422, "responses.1"),
    ({"prompts": "a", "responses": ["x"]}, 422, "prompts"),
    ({"prompts": ["a"], "responses": ["x"], "ttl_s": -1}, 422, "ttl_s"),
    ({"prompts": ["a"], "responses": ["x"], "namespace": ""}, 422, "namespace"),
    ({"prompts": ["a"], "responses": ["x" * 9000]}, 413, "8192 bytes"),
])
def test_bad_batch_stores_get_a_clear_4xx_and_store_nothing(body, status, text):
    app, backend, cache, embed = build()
    api = TestClient(app, raise_server_exceptions=False)
    reply = api.post("/v1/cache/store", json=body)
    assert reply.status_code == status, reply.text
    assert text in reply.json()["error"]["message"] and "Traceback" not in reply.text
    assert len(cache) == 0 and cache.stats()["stores"] == 0 and embed.calls == []


def test_a_lone_surrogate_in_a_batch_is_named_and_nothing_is_stored():
    app, backend, cache, embed = build()
    api = TestClient(app, raise_server_exceptions=False)
    reply = api.post("/v1/cache/store", content=b'{"prompts": ["ok", "fine"], "responses": ["a", "\\ud800"]}',
                     headers={"content-type": "application/json"})
    assert reply.status_code == 422 and "responses[1]" in reply.json()["error"]["message"]
    assert len(cache) == 0


def test_a_failing_batch_store_is_a_503_and_stores_nothing():
    class Down(CountingEmbedder):
        async def __call__(self, texts):
            raise ConnectionError("embedder replica unreachable")

    app, backend, cache, embed = build(embed=Down())
    reply = TestClient(app, raise_server_exceptions=False).post(
        "/v1/cache/store", json={"prompts": ["a", "b"], "responses": ["x", "y"]})
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1" and len(cache) == 0


def test_a_backend_without_store_batch_gets_one_store_per_prompt():
    class OnlySingle:
        def __init__(self):
            self.stored = []

        async def store(self, prompt, response, namespace="default", history=None, ttl_s=None):
            self.stored.append((prompt, response, namespace))
            return len(self.stored)

    backend = OnlySingle()
    api = TestClient(create_app(backend, ApiSettings(**LIMITS)))
    reply = api.post("/v1/cache/store", json={"prompts": ["a", "b"], "responses": ["x", "y"], "namespace": "n"})
    assert reply.json() == {"entry_ids": [1, 2]} and backend.stored == [("a", "x", "n"), ("b", "y", "n")]


# ----------------------------------------------------------------------------- single flight
async def _concurrent_chats(app, bodies):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://raycache.test") as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))


def test_concurrent_identical_misses_make_one_upstream_call():
    upstream = SlowUpstream(delay_s=0.3)
    app, backend, cache, embed = build(upstream=upstream.client())
    replies = asyncio.run(_concurrent_chats(app, [chat_body("how do I reset my router password")] * 8))
    assert upstream.prompts == ["how do I reset my router password"]
    assert all(r.status_code == 200 for r in replies)
    kinds = sorted(r.headers["x-raycache"] for r in replies)
    assert kinds == ["hit"] * 7 + ["miss"]
    contents = {r.json()["choices"][0]["message"]["content"] for r in replies}
    assert contents == {"answer to: how do I reset my router password"} and len(cache) == 1


def test_different_requests_are_not_coalesced():
    upstream = SlowUpstream(delay_s=0.2)
    app, backend, cache, embed = build(upstream=upstream.client())
    bodies = [chat_body("how do I reset my router password"),
              chat_body("how do I reset my router password", temperature=0.5),  # another key
              chat_body("what is the capital of france"),
              {**chat_body("how do I reset my router password"), "namespace": "other"}]
    replies = asyncio.run(_concurrent_chats(app, bodies))
    assert [r.headers["x-raycache"] for r in replies] == ["miss"] * 4 and len(upstream.prompts) == 4


def test_followers_of_a_failed_leader_call_the_upstream_themselves():
    upstream = SlowUpstream(delay_s=0.2, status=500)
    app, backend, cache, embed = build(upstream=upstream.client())
    replies = asyncio.run(_concurrent_chats(app, [chat_body("how do I reset my router password")] * 3))
    assert [r.status_code for r in replies] == [502] * 3 and len(upstream.prompts) == 3
    assert len(cache) == 0


def test_single_flight_releases_waiters_when_the_leader_is_cancelled():
    async def scenario():
        flights = SingleFlight()
        entered = asyncio.Event()

        async def leader():
            async with flights.join("k") as lead:
                assert lead
                entered.set()
                await asyncio.sleep(10)

        async def follower():
            await entered.wait()
            async with flights.join("k") as lead:
                return lead

        task = asyncio.create_task(leader())
        waiting = asyncio.create_task(follower())
        await entered.wait()
        await asyncio.sleep(0.01)
        task.cancel()
        assert await asyncio.wait_for(waiting, 1) is False
        assert len(flights) == 0 and flights.coalesced == 1

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- off the loop
class ThreadRecordingCache(SemanticCache):
    """Records the thread every cache call runs on."""

    threads: set

    def _record(self):
        self.threads.add(threading.get_ident())

    def begin_lookup(self, *args, **kwargs):
        self._record()
        return super().begin_lookup(*args, **kwargs)

    def complete_lookup(self, *args, **kwargs):
        self._record()
        return super().complete_lookup(*args, **kwargs)

    def store_batch(self, *args, **kwargs):
        self._record()
        return super().store_batch(*args, **kwargs)

    def stats(self):
        self._record()
        return super().stats()

    def clear(self, namespace=None):
        self._record()
        return super().clear(namespace)


def test_cache_calls_run_in_worker_threads_not_on_the_event_loop():
    cache = ThreadRecordingCache(None, DIM, policy=StaticThreshold(0.9))
    cache.threads = set()
    backend = EngineBackend(cache, embed=CountingEmbedder())

    async def scenario():
        loop_thread = threading.get_ident()
        await backend.store("seed prompt", "s")
        await backend.lookup(["seed prompt", "another prompt"])
        await backend.store_batch(["x one", "y two"], ["x", "y"])
        await backend.stats()
        await backend.clear()
        return loop_thread

    loop_thread = asyncio.run(scenario())
    assert cache.threads and loop_thread not in cache.threads


def test_a_slow_cache_call_does_not_stall_other_requests():
    class SlowCache(SemanticCache):
        def complete_lookup(self, *args, **kwargs):
            import time
            time.sleep(0.4)  # a long search under the lock
            return super().complete_lookup(*args, **kwargs)

    app, backend, cache, embed = build(cache=SlowCache(None, DIM, policy=StaticThreshold(0.9)))

    async def scenario():
        await backend.store("seed prompt", "s")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://raycache.test") as client:
            slow = asyncio.create_task(client.post("/v1/cache/lookup", json={"prompt": "a new prompt"}))
            await asyncio.sleep(0.05)
            loop = asyncio.get_running_loop()
            started = loop.time()
            health = await client.get("/healthz")
            waited = loop.time() - started
            assert (await slow).status_code == 200
            return health.status_code, waited

    status, waited = asyncio.run(scenario())
    assert status == 200 and waited < 0.2
