"""Safe cache keys and a service that never answers wrongly by construction (issue 15).

Over real HTTP (uvicorn on loopback, the real all-MiniLM-L6-v2 encoder, threshold 0.85, an
in-test OpenAI-compatible upstream on its own port): the chat key covers every answer-changing
field; long prompts that share their embedded window never hit each other; a streamed miss then a
streamed hit read with the official ``openai`` client give the same text; tenant keys cannot see,
overwrite or clear another tenant's namespace. In process: the exact tier, failures mapped to
502/503/504 (and a schemathesis run with faults injected), gauges updated on every request.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import schemathesis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raycache.cache import SemanticCache, StaticThreshold
from raycache.cache.policy import CalibratedThreshold
from raycache.cli import config_from_args
from raycache.config import CacheConfig, ConfigError, ServeConfig
from raycache.service.api import (ApiSettings, EngineBackend, StreamAssembler, create_app, key_digest,
                                  read_api_keys, replay_pieces)
from raycache.service.app import api_settings
from raycache.service.upstream import UpstreamClient
from tests.http_server import serving
from tests.test_cache import DIM, HashingEncoder

ADMIN_KEY = "safety-admin-KEY-0001"
KEY_A = "tenant-A-KEY-1111"
KEY_B = "tenant-B-KEY-2222"
GRANTS = {KEY_A: {"namespaces": ["a1", "a2"]}, KEY_B: {"namespaces": ["b1"]}}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
THRESHOLD = 0.85
PREAMBLE = ("You are the support assistant of Example Corp. Follow the policy below to the letter. " +
            " ".join(f"Rule {i}: requests of category {i} must be answered politely, citing section {i} "
                     f"of the handbook, and never disclose internal ticket numbers." for i in range(20)))


# ----------------------------------------------------------------------------- helpers


def answer_for(body: dict, index: int = 0) -> str:
    """The upstream's answer names the prompt and every other field, so a wrong hit shows."""
    prompt = body["messages"][-1]["content"]
    fields = {k: v for k, v in sorted(body.items()) if k not in ("messages", "stream", "stream_options")}
    return f"LLM#{index} to {prompt[-60:]!r} with {json.dumps(fields, sort_keys=True)}"


def upstream_app(calls: list) -> FastAPI:
    """An OpenAI-compatible chat server; the last user message steers faults."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        calls.append(body)
        prompt = body["messages"][-1]["content"]
        if "CHOICES5" in prompt:
            return {"choices": 5}
        if "BADMESSAGE" in prompt:
            return {"choices": [{"index": 0, "message": 5}]}
        if "BUSY" in prompt:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=429,
                                headers={"retry-after": "7"})
        if "SLOW" in prompt:
            await asyncio.sleep(2.0)
        n = body.get("n", 1)
        answers = [answer_for(body, i) for i in range(n)]
        if body.get("stream"):
            async def events():
                base = {"id": "up", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
                for i, answer in enumerate(answers):
                    yield "data: " + json.dumps({**base, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}) + "\n\n"
                    for piece in replay_pieces(answer, 3):
                        yield "data: " + json.dumps({**base, "choices": [
                            {"index": i, "delta": {"content": piece}, "finish_reason": None}]}) + "\n\n"
                    if "CUTOFF" in prompt:
                        return  # the stream breaks off: no finish_reason, no [DONE]
                    yield "data: " + json.dumps({**base, "choices": [
                        {"index": i, "delta": {}, "finish_reason": "stop"}]}) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": "up", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": i, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": a}} for i, a in enumerate(answers)],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}

    return app


def api_settings_for(upstream_url: str, **extra) -> ApiSettings:
    grants = {key_digest(k): g for k, g in GRANTS.items()}
    return ApiSettings(api_key_sha256=key_digest(ADMIN_KEY), api_keys=grants, upstream=upstream_url,
                       upstream_timeout_s=1.0, max_prompt_chars=8000, **extra)


@pytest.fixture(scope="module")
def upstream():
    calls: list = []
    with serving(upstream_app(calls)) as url:
        yield url + "/v1", calls


@pytest.fixture(scope="module")
def real_cache(encoder):
    return SemanticCache.from_config(CacheConfig(threshold=THRESHOLD), encoder=encoder)


@pytest.fixture(scope="module")
def service(upstream, real_cache):
    """raycache's API over the real encoder, with the admin key and two tenant keys."""
    app = create_app(EngineBackend(real_cache), api_settings_for(upstream[0]))
    with serving(app) as url, httpx.Client(base_url=url, headers=ADMIN, timeout=60) as client:
        yield client


def chat(client, prompt, namespace="chat", system="Be brief.", key=ADMIN_KEY, **fields):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}",
                                                        "x-raycache-namespace": namespace},
                       json={"model": "m", "messages": messages, **fields})


# ----------------------------------------------------------------------------- 1. the chat key
VARIANTS = [{"max_tokens": 500}, {"temperature": 0.9}, {"top_p": 0.5}, {"stop": ["\n"]}, {"seed": 7},
            {"response_format": {"type": "json_object"}}, {"presence_penalty": 1.0},
            {"logit_bias": {"50256": -100}}, {"max_completion_tokens": 10}]


def test_chat_key_holds_every_answer_changing_field_over_http(service, upstream):
    """The issue's case first: an answer made for max_tokens=10 is never served to max_tokens=500.
    Each sampling / format variant of the same messages is a miss answered by the upstream for that
    variant; a repeat of any of them is a hit with its own answer."""
    prompt = "Summarise the return policy for opened electronics."
    base = {"max_tokens": 10, "temperature": 0}
    first = chat(service, prompt, **base)
    assert first.headers["x-raycache"] == "miss" and first.json()["raycache"]["stored"] is True
    answers = {json.dumps(base): first.json()["choices"][0]["message"]["content"]}
    for variant in VARIANTS:
        fields = {**base, **variant}
        reply = chat(service, prompt, **fields)
        assert reply.status_code == 200 and reply.headers["x-raycache"] == "miss", variant
        content = reply.json()["choices"][0]["message"]["content"]
        assert content == answer_for({"model": "m", "messages": [{"content": prompt}], **fields})
        answers[json.dumps(fields)] = content
    for other_system in ("Be long.", None):
        assert chat(service, prompt, system=other_system, **base).headers["x-raycache"] == "miss"
    calls = len(upstream[1])
    for fields_json, content in answers.items():
        again = chat(service, prompt, **json.loads(fields_json))
        assert again.headers["x-raycache"] == "hit", fields_json
        assert again.json()["choices"][0]["message"]["content"] == content
    assert len(upstream[1]) == calls
    # fields known not to change the answer (user, metadata) still hit
    assert chat(service, prompt, user="someone-else", **base).headers["x-raycache"] == "hit"


def test_tools_n_and_unknown_fields_bypass_and_the_keyed_fields_are_listed(service, upstream):
    prompt = "What is the weather in Oslo right now?"
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    for fields, reason in (({"tools": tools}, "tools"), ({"n": 2}, "n > 1"),
                           ({"frobnicate": True}, "frobnicate")):
        for _ in range(2):  # never cached: bypass both times, each answered upstream
            calls = len(upstream[1])
            reply = chat(service, prompt, **fields)
            assert reply.status_code == 200 and reply.headers["x-raycache"] == "bypass", fields
            assert reason in reply.headers["x-raycache-bypass-reason"] and len(upstream[1]) == calls + 1
    assert len(reply.json()["choices"]) == 1
    keyed = service.get("/v1/cache/stats").json()["chat_key"]
    assert {"model", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "tools",
            "tool_choice", "response_format", "n"} <= set(keyed["keyed_fields"])
    assert {"user", "stream", "stream_options"} <= set(keyed["unkeyed_fields"])
    assert keyed["other_fields"] == "bypass" and keyed["cache_tools"] is False


def make_client(upstream_handle=None, backend=None, cache=None, **extra) -> TestClient:
    if cache is None:  # (an empty cache is falsy: it has a length)
        cache = SemanticCache(HashingEncoder(), DIM, policy=StaticThreshold(0.9))
    client = None
    if upstream_handle is not None:
        client = UpstreamClient("http://upstream.test/v1", transport=httpx.MockTransport(upstream_handle))
    app = create_app(backend or EngineBackend(cache), ApiSettings(**extra), client)
    return TestClient(app, raise_server_exceptions=False)


def mock_upstream(calls: list):
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append(body)
        return httpx.Response(200, json={"id": "up", "object": "chat.completion", "model": body["model"], "choices": [
            {"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": answer_for(body, i)}}
            for i in range(body.get("n", 1))]})
    return handle


def test_configured_tools_and_n_are_keyed_and_cached():
    calls: list = []
    api = make_client(mock_upstream(calls), chat_cache_tools=True, chat_cache_n=True,
                      chat_key_fields=["n", "tools", "max_tokens"], chat_unkeyed_fields=[])
    tools = [{"type": "function", "function": {"name": "f"}}]

    def ask(**fields):
        return api.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hello there friend"}], **fields})

    two = ask(n=2, tools=tools)
    assert two.headers["x-raycache"] == "miss" and two.json()["raycache"]["stored"] is True
    again = ask(n=2, tools=tools)
    assert again.headers["x-raycache"] == "hit" and len(calls) == 1
    assert [c["message"]["content"] for c in again.json()["choices"]] == \
        [c["message"]["content"] for c in two.json()["choices"]] and len(again.json()["choices"]) == 2
    assert ask(n=2).headers["x-raycache"] == "miss"  # other tools: other key
    assert ask(n=3, tools=tools).headers["x-raycache"] == "miss"
    assert ask(tools=tools, temperature=1).headers["x-raycache"] == "bypass"  # temperature: not listed here
    assert api.get("/v1/cache/stats").json()["chat_key"]["keyed_fields"] == ["model", "messages", "max_tokens",
                                                                              "n", "tools"]


# ----------------------------------------------------------------------------- 2. no 500s
def test_upstream_faults_are_502_or_504_with_a_message_and_store_nothing(service, real_cache):
    stores = service.get("/v1/cache/stats").json()["stores"]
    for prompt, status, text in (("please answer CHOICES5", 502, "'choices' is not a list"),
                                 ("please answer BADMESSAGE", 502, "'message' is not an object"),
                                 ("please be SLOW", 504, "timed out")):
        reply = chat(service, prompt)
        assert reply.status_code == status, reply.text
        assert text in reply.json()["error"]["message"] and "Traceback" not in reply.text
    busy = chat(service, "the model is BUSY")
    assert busy.status_code == 502 and busy.headers["retry-after"] == "7"
    assert service.get("/v1/cache/stats").json()["stores"] == stores


class FailingEmbedder:
    """An embedder that fails (a replica down) while ``down`` is set."""

    def __init__(self) -> None:
        self.encoder = HashingEncoder()
        self.down = False

    async def __call__(self, texts):
        if self.down:
            raise ConnectionError("embedder replica unreachable")
        return self.encoder.encode(texts)


def test_embedder_failure_is_a_503_with_retry_after_and_chat_still_answers():
    calls: list = []
    embed = FailingEmbedder()
    cache = SemanticCache(None, DIM, policy=StaticThreshold(0.9))
    api = make_client(mock_upstream(calls), backend=EngineBackend(cache, embed=embed))
    assert api.post("/v1/cache/store", json={"prompt": "reset my router", "response": "R"}).status_code == 200
    embed.down = True
    for path, body in (("/v1/cache/store", {"prompt": "reset my modem", "response": "M"}),
                       ("/v1/cache/lookup", {"prompt": "reset the router please"})):
        reply = api.post(path, json=body)
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1", reply.text
        assert "cache is unavailable" in reply.json()["error"]["message"]
        assert "unreachable" not in reply.text  # the cause's detail stays in the log
    assert api.post("/v1/cache/lookup", json={"prompt": "reset my router"}).json()["hit"]  # exact: no embedding
    proxied = api.post("/v1/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": "reset the router please"}]})
    assert proxied.status_code == 200 and proxied.headers["x-raycache"] == "miss" and len(calls) == 1


class FaultyUpstream:
    """Rotates through good answers and every kind of garbage or failure."""

    def __init__(self) -> None:
        self.n = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.n += 1
        kind = self.n % 8
        if kind == 0:
            raise httpx.ReadTimeout("slow", request=request)
        if kind == 1:
            raise httpx.ConnectError("refused", request=request)
        return [None, None, httpx.Response(200, json={"choices": 5}), httpx.Response(200, content=b"{x"),
                httpx.Response(200, json={"choices": [{"message": "x"}]}),
                httpx.Response(503, text="down", headers={"retry-after": "2"}),
                httpx.Response(200, content=b'data: {"choices": 5}\n\ndata: [DONE]\n\n',
                               headers={"content-type": "text/event-stream"}),
                httpx.Response(200, json={"choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": "ok"}}]}),
                ][kind]


class FlakyEmbedder(FailingEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def __call__(self, texts):
        self.calls += 1
        self.down = self.calls % 3 == 0
        return await super().__call__(texts)


_faulty_api = make_client(FaultyUpstream().handle,
                          backend=EngineBackend(SemanticCache(None, DIM, policy=StaticThreshold(0.5)),
                                                embed=FlakyEmbedder()))
_faulty_schema = schemathesis.openapi.from_asgi("/openapi.json", _faulty_api.app)


@_faulty_schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_with_upstream_and_embedder_faults_never_get_a_500(case):
    response = case.call()
    assert response.status_code < 500 or response.status_code in (502, 503, 504), response.text
    if response.status_code == 503:
        assert response.headers.get("retry-after") == ["1"]  # schemathesis lists header values


def test_gauges_move_on_every_request_not_only_on_stats():
    from tests.test_service_engine import start_engine

    class Gauge:
        def __init__(self):
            self.values = []

        def set(self, value, tags=None):
            self.values.append(value)

    import tempfile
    engine = start_engine(tempfile.mkdtemp() + "/c.npz")
    engine.metrics.entries = gauge = Gauge()
    asyncio.run(engine.store("how do I reset my router password", "Hold reset.", "n"))
    asyncio.run(engine.store("what is the capital of france", "Paris", "n"))
    assert gauge.values == [1, 2]
    asyncio.run(engine.lookup(["how do I reset my router password please"], "n"))
    asyncio.run(engine.clear("n"))
    assert gauge.values == [1, 2, 2, 0]
    engine.saver.stop(final_save=False)


# ----------------------------------------------------------------------------- 3. long prompts
def long_prompt(question: str) -> str:
    return f"{PREAMBLE}\n\nQuestion: {question}"


def test_the_encoder_embeds_its_real_window_and_reports_the_rest(encoder):
    assert encoder.window == encoder.max_length == 256  # all-MiniLM-L6-v2's max_seq_length
    text = long_prompt("what is the capital of France?")
    n_tokens = len(encoder.tokenizer(text)["input_ids"])
    assert 450 <= n_tokens <= 560  # a ~500-token prompt
    (tail,) = encoder.unembedded_tails([text])
    assert text.endswith(tail) and tail.endswith("Question: what is the capital of France?")
    head = text[:len(text) - len(tail)]
    assert len(encoder.tokenizer(head)["input_ids"]) == encoder.max_length  # the head is the window
    assert encoder.unembedded_tails(["short prompt", PREAMBLE[:200]]) == ["", ""]


def test_500_token_prompts_sharing_their_window_never_hit_each_other_over_http(service, upstream):
    questions = ["what is the capital of France?", "how many legs does a spider have?",
                 "what is the boiling point of water at sea level?"]
    prompts = [long_prompt(q) for q in questions]
    stored = service.post("/v1/cache/store", json={"prompt": prompts[0], "response": "Paris", "namespace": "rag"})
    assert stored.status_code == 200
    found = service.post("/v1/cache/lookup", json={"prompts": prompts, "namespace": "rag"}).json()["results"]
    assert found[0]["hit"] and found[0]["exact"] and found[0]["response"] == "Paris"
    assert [r["hit"] for r in found[1:]] == [False, False]
    # even when the embedded windows are identical (similarity ~1): the tail decides, exactly
    spaced = prompts[0].replace("Question:", "Question:  ")
    assert service.post("/v1/cache/lookup", json={"prompt": spaced, "namespace": "rag"}).json()["hit"]
    # the chat proxy: each long question gets its own upstream answer, then hits only itself
    replies = [chat(service, p, namespace="rag-chat") for p in prompts]
    assert [r.headers["x-raycache"] for r in replies] == ["miss"] * 3
    for p, q, first in zip(prompts, questions, replies):
        again = chat(service, p, namespace="rag-chat")
        assert again.headers["x-raycache"] == "hit"
        assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
        assert q[-40:] in again.json()["choices"][0]["message"]["content"]


def test_long_prompts_never_hit_at_any_threshold_unless_the_tail_matches(encoder, tmp_path):
    """Threshold -1: every entry of a scope is close enough, so only the scope can keep long prompts
    apart. A snapshot round trip keeps the tail scopes."""
    cache = SemanticCache(encoder, encoder.dim, policy=StaticThreshold(-1.0))
    paris = long_prompt("what is the capital of France?")
    cache.store(paris, "Paris", "ns")
    cache.store("a short prompt about spiders", "eight", "ns")
    spider = long_prompt("how many legs does a spider have?")
    result = cache.check(spider, "ns")
    assert not result.hit and result.response is None
    other_preamble = long_prompt("what is the capital of France?").replace("Example Corp", "Other Inc")
    same_tail = cache.check(other_preamble, "ns")  # differs inside the window, same tail: may hit
    assert same_tail.hit and same_tail.response == "Paris" and not same_tail.exact
    cache.save(tmp_path / "c.npz")
    restored = SemanticCache.load(tmp_path / "c.npz", encoder, policy=StaticThreshold(-1.0))
    assert not restored.check(spider, "ns").hit
    assert restored.check(other_preamble, "ns").response == "Paris"
    assert restored.check("spiders, short", "ns").response == "eight"
    assert restored.clear("ns") == 2 and not restored.check(other_preamble, "ns").hit


# ----------------------------------------------------------------------------- 4. the exact tier
def test_exact_tier_is_whitespace_only_and_its_hits_go_through_the_policy():
    cache = SemanticCache(HashingEncoder(), DIM, policy=StaticThreshold(0.99))
    cache.store("Is the US in NATO?", "yes")
    assert cache.check("Is  the US in NATO?\n").exact
    assert not cache.check("is the us in nato?").exact  # case differs: not the same text by default
    stats = cache.stats()
    assert stats["exact_hits"] == 1 and stats["hits"] >= 1 and stats["exact_match"] == "whitespace-normalised"
    folded = SemanticCache.from_config(CacheConfig(exact_casefold=True), encoder=HashingEncoder())
    folded.store("Is the US in NATO?", "yes")
    assert folded.check("is the us in nato?").exact
    never = CalibratedThreshold(float("inf"), 0.02, 0.95, None, 100, 0, 0)  # no threshold met δ
    strict = SemanticCache(HashingEncoder(), DIM, policy=never)
    strict.store("Is the US in NATO?", "yes")
    missed = strict.check("Is the US in NATO?")
    assert not missed.hit and missed.response is None and missed.similarity == 1.0
    assert strict.stats()["hits"] == 0 and strict.stats()["misses"] == 1


# ----------------------------------------------------------------------------- 5. cached streaming
def openai_client(service, key=ADMIN_KEY, namespace="stream") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=key, max_retries=0,
                         default_headers={"x-raycache-namespace": namespace})


def read_stream(client: openai.OpenAI, prompt: str, **fields) -> tuple[str, str, list]:
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": prompt}], stream=True, **fields)
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return raw.headers["x-raycache"], text, chunks


def test_streamed_miss_then_streamed_hit_with_the_openai_client(service, upstream):
    client = openai_client(service)
    prompt = "Explain in two sentences why the sky is blue."
    header, first, _ = read_stream(client, prompt)
    assert header == "miss" and first == answer_for({"model": "m", "messages": [{"content": prompt}]})
    calls = len(upstream[1])
    header, second, chunks = read_stream(client, prompt, stream_options={"include_usage": True})
    assert header == "hit" and second == first and len(upstream[1]) == calls
    assert len(chunks) > 3 and chunks[-1].usage.total_tokens == 0 and chunks[-2].choices[0].finish_reason == "stop"
    paraphrase = client.chat.completions.create(model="m", messages=[
        {"role": "user", "content": "Explain in two sentences why the sky is blue, please."}])
    assert paraphrase.choices[0].message.content == first and len(upstream[1]) == calls  # non-streamed hit
    header, third, _ = read_stream(client, prompt, max_tokens=50)  # another key: a miss
    assert header == "miss" and third != first


def test_a_broken_off_stream_reaches_the_client_and_is_not_stored(service, upstream):
    client = openai_client(service)
    prompt = "Tell me a story, CUTOFF midway."
    header, text, _ = read_stream(client, prompt)
    assert header == "miss" and text  # what the upstream sent went through
    header, again, _ = read_stream(client, prompt)
    assert header == "miss"  # nothing was cached from the incomplete stream


def test_a_stream_whose_connection_fails_ends_with_an_error_event_and_is_not_stored():
    async def broken():
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "Hal"}}]}\n\n'
        raise httpx.ReadError("connection reset")

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=broken())

    api = make_client(handle)
    reply = api.post("/v1/chat/completions", json={"model": "m", "stream": True, "messages": [
        {"role": "user", "content": "stream something"}]})
    assert reply.status_code == 200 and reply.headers["x-raycache"] == "miss"
    events = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["content"] == "Hal"
    assert events[-1]["error"]["type"] == "upstream_error" and "ReadError" in events[-1]["error"]["message"]
    assert api.get("/v1/cache/stats").json()["stores"] == 0


def test_stream_assembler_reads_split_lines_and_refuses_tool_calls():
    assembler = StreamAssembler(1)
    for line in (b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}', b"",
                 b'data: {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}'):
        assembler.feed(line)
    assert assembler.feed(b"data: [DONE]") == "done" and assembler.contents() == ["Hello"]
    tools = StreamAssembler(1)
    tools.feed(b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"id": "x"}]}, "finish_reason": "stop"}]}')
    assert tools.contents() is None
    assert "".join(replay_pieces("  two  words\nand more ")) == "  two  words\nand more "


# ----------------------------------------------------------------------------- 6. tenant keys
def as_key(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_tenant_keys_reach_only_their_namespaces_over_http(service):
    a, b = as_key(KEY_A), as_key(KEY_B)
    assert service.post("/v1/cache/store", headers=a, json={"prompt": "secret plan A", "response": "A!",
                                                            "namespace": "a1"}).status_code == 200
    for method, path, kwargs in (
            ("POST", "/v1/cache/lookup", {"json": {"prompt": "secret plan A", "namespace": "a1"}}),
            ("POST", "/v1/cache/store", {"json": {"prompt": "x", "response": "y", "namespace": "a1"}}),
            ("DELETE", "/v1/cache", {"params": {"namespace": "a1"}}),
            ("DELETE", "/v1/cache", {}), ("GET", "/v1/cache/stats", {})):
        reply = service.request(method, path, headers=b, **kwargs)
        assert reply.status_code == 403 and reply.json()["error"]["type"] == "forbidden", (method, path)
    assert chat(service, "secret plan A", namespace="a1", key=KEY_B).status_code == 403
    assert service.post("/v1/cache/lookup", headers=b, json={"prompt": "secret plan A", "namespace": "b1"}
                        ).json()["hit"] is False
    assert service.post("/v1/cache/lookup", headers=a, json={"prompt": "secret plan A", "namespace": "a1"}
                        ).json()["response"] == "A!"
    assert service.get("/v1/cache/stats").status_code == 200  # the admin key does everything
    assert service.delete("/v1/cache", params={"namespace": "a1"}).json()["removed"] == 1
    assert service.get("/v1/cache/stats", headers=as_key("not-a-key-at-all")).status_code == 401


OPS = st.lists(st.tuples(st.sampled_from([KEY_A, KEY_B]), st.sampled_from(["store", "lookup", "clear", "chat"]),
                         st.sampled_from(["a1", "a2", "b1"]), st.sampled_from(["p0", "p1"])), max_size=20)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=OPS)
def test_no_sequence_of_requests_with_one_key_reads_or_changes_another_keys_namespace(ops):
    """Threshold -1 (any entry of the scope is close enough): a request for a namespace its key
    does not hold gets 403 and changes nothing; every answer comes from the caller's own entries."""
    calls: list = []
    api = make_client(mock_upstream(calls), cache=SemanticCache(HashingEncoder(), DIM, policy=StaticThreshold(-1)),
                      api_keys={key_digest(k): g for k, g in GRANTS.items()})
    held = {k: set(g["namespaces"]) for k, g in GRANTS.items()}
    stored: dict[str, dict[str, str]] = {}  # namespace -> prompt -> response (the model)
    chats: dict[str, dict[str, str]] = {}  # namespace -> prompt -> answer the chat proxy stored (own scope)
    for n, (key, op, namespace, prompt) in enumerate(ops):
        text = f"tell me about {prompt} please"
        headers = as_key(key)
        if op == "store":
            reply = api.post("/v1/cache/store", headers=headers,
                             json={"prompt": text, "response": f"{key}:{n}", "namespace": namespace})
        elif op == "lookup":
            reply = api.post("/v1/cache/lookup", headers=headers, json={"prompt": text, "namespace": namespace})
        elif op == "clear":
            reply = api.delete("/v1/cache", headers=headers, params={"namespace": namespace})
        else:
            reply = api.post("/v1/chat/completions", headers={**headers, "x-raycache-namespace": namespace},
                             json={"model": "m", "messages": [{"role": "user", "content": text}]})
        if namespace not in held[key]:
            assert reply.status_code == 403, (key, op, namespace)
            continue
        assert reply.status_code == 200, reply.text
        if op == "store":
            stored.setdefault(namespace, {})[text] = f"{key}:{n}"
        elif op == "clear":
            assert reply.json()["removed"] == len(stored.pop(namespace, {})) + len(chats.pop(namespace, ()))
        elif op == "lookup":
            found = reply.json()
            assert found["hit"] == bool(stored.get(namespace))
            if found["hit"]:
                assert found["response"] in stored[namespace].values()
                assert found["response"].startswith(key)  # only the holder ever stored here
        else:
            content = reply.json()["choices"][0]["message"]["content"]
            assert (reply.headers["x-raycache"] == "hit") == bool(chats.get(namespace))
            if reply.headers["x-raycache"] == "hit":
                assert content in chats[namespace].values()
            else:
                assert content == answer_for({"model": "m", "messages": [{"content": text}]})
                chats.setdefault(namespace, {})[text] = content
    assert api.get("/v1/cache/stats", headers=as_key(KEY_A)).status_code == 403


def test_api_keys_file_is_read_checked_and_reaches_the_settings(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({**GRANTS, "an-admin-key-99": {"admin": True}}))
    cfg = config_from_args("serve", ["--api-keys-file", str(path)])
    assert cfg.api_keys_file == str(path)
    monkeypatch.setenv("RAYCACHE_API_KEY", ADMIN_KEY)
    settings_ = api_settings(cfg)
    assert settings_.api_key_sha256 == key_digest(ADMIN_KEY)
    assert settings_.api_keys[key_digest(KEY_A)].namespaces == ["a1", "a2"]
    assert settings_.api_keys[key_digest("an-admin-key-99")].admin
    assert KEY_A not in settings_.model_dump_json()  # only digests travel to the replicas
    for bad, problem in (("[1]", "JSON object"), ("{", "not valid JSON"),
                         ('{"short": {"admin": true}}', "at least 8"),
                         ('{"long-enough-key": {"namespaces": "a1"}}', "list"),
                         ('{"long-enough-key": {"admin": false}}', "expected")):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=problem):
            api_settings(ServeConfig(api_keys_file=str(path)))
    with pytest.raises(ValueError, match="cannot read"):
        read_api_keys(str(tmp_path / "missing.json"))
