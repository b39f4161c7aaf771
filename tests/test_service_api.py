"""The HTTP API in process (no Ray): limits, API key, error shapes, the chat proxy, fuzzing.

The app runs over an EngineBackend with the hashing test encoder; the upstream LLM is an
httpx.MockTransport. The Ray Serve deployment of the same app is tested in test_service.py.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from raycache.cache import SemanticCache, StaticThreshold, history_hash
from raycache.service.api import ApiSettings, EngineBackend, create_app, key_digest
from raycache.service.chat_scope import ChatKeyPolicy, chat_key
from raycache.service.upstream import UpstreamClient, chat_completions_url
from tests.test_cache import DIM, HashingEncoder

KEY = "test-key-123"
AUTH = {"authorization": f"Bearer {KEY}"}
LIMITS = dict(max_request_bytes=4096, max_prompt_chars=200, max_batch_prompts=4)


class FakeUpstream:
    """An OpenAI-compatible chat endpoint as an httpx transport; prompts steer failures."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append({"body": body, "auth": request.headers.get("authorization")})
        prompt = str(body["messages"][-1].get("content"))
        if "TIMEOUT" in prompt:
            raise httpx.ReadTimeout("slow", request=request)
        if "UNREACHABLE" in prompt:
            raise httpx.ConnectError("refused", request=request)
        if "FAIL" in prompt:
            return httpx.Response(500, json={"error": {"message": "model crashed"}})
        if body.get("stream"):
            return httpx.Response(200, content=b'data: {"x": 1}\n\ndata: [DONE]\n\n',
                                  headers={"content-type": "text/event-stream"})
        finish = "length" if "TRUNCATE" in prompt else "stop"
        return httpx.Response(200, json={
            "id": "up-1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": f"answer to: {prompt}"}}]})


def make_client(api_key=KEY, upstream: FakeUpstream | None = None, backend=None, **limits) -> TestClient:
    cache = SemanticCache(HashingEncoder(), DIM, policy=StaticThreshold(0.9))
    settings_ = ApiSettings(api_key_sha256=key_digest(api_key), **{**LIMITS, **limits})
    client = None
    if upstream is not None:
        client = UpstreamClient("http://upstream.test/v1", api_key="up-key",
                                transport=httpx.MockTransport(upstream.handle))
    app = create_app(backend or EngineBackend(cache), settings_, client)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture()
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture()
def api(upstream) -> TestClient:
    return make_client(upstream=upstream)


def assert_error(response: httpx.Response, status: int, text: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert text.lower() in error["message"].lower() and error["code"] == status
    assert "Traceback" not in response.text


# ----------------------------------------------------------------------------- API key
@pytest.mark.parametrize("method, path", [("post", "/v1/cache/lookup"), ("get", "/v1/cache/stats"),
                                          ("delete", "/v1/cache"), ("get", "/docs"),
                                          ("get", "/openapi.json"), ("get", "/nope")])
def test_every_route_but_health_needs_the_key(api, method, path):
    assert_error(api.request(method, path), 401, "API key")
    assert_error(api.request(method, path, headers={"authorization": "Bearer wrong"}), 401)


def test_key_as_bearer_or_header_and_health_is_open(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/v1/cache/stats", headers=AUTH).status_code == 200
    assert api.get("/v1/cache/stats", headers={"x-api-key": KEY}).status_code == 200
    assert api.get("/v1/cache/stats", headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert make_client(api_key=None).get("/v1/cache/stats").status_code == 200  # no key set: open


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("body, status, text", [
    ('{"prompt": ', 400, "not valid JSON"),
    ("[1, 2]", 422, ""),
    ("{}", 422, "exactly one"),
    ('{"prompt": "a", "prompts": ["b"]}', 422, "exactly one"),
    ('{"prompt": 5}', 422, "prompt"),
    ('{"prompt": "a", "colour": "red"}', 422, "colour"),
    ('{"prompt": "   "}', 422, "empty"),
    ('{"prompt": "' + "x" * 201 + '"}', 422, "limit is 200"),
    ('{"prompts": []}', 422, "empty"),
    ('{"prompts": ["a", "b", "c", "d", "e"]}', 422, "limit is 4"),
    ('{"prompts": ["a", ""]}', 422, "prompts[1]"),
    ('{"prompt": "a", "namespace": ""}', 422, "namespace"),
    ('{"prompt": "a", "history": "not a list"}', 422, "history"),
])
def test_bad_lookups_get_a_clear_4xx(api, body, status, text):
    response = api.post("/v1/cache/lookup", content=body,
                        headers={**AUTH, "content-type": "application/json"})
    assert_error(response, status, text)


@pytest.mark.parametrize("body, text", [
    ({"prompt": "a"}, "response"),
    ({"prompt": "a", "response": "b", "ttl_s": 0}, "ttl_s"),
    ({"prompt": "a", "response": ["b"]}, "response"),
])
def test_bad_stores(api, body, text):
    assert_error(api.post("/v1/cache/store", json=body, headers=AUTH), 422, text)


def test_body_size_limit_declared_or_chunked(api):
    big = json.dumps({"prompt": "a", "response": "x" * 5000})
    assert_error(api.post("/v1/cache/store", content=big, headers={**AUTH, "content-type": "application/json"}),
                 413, "4096 bytes")
    chunks = iter([big[:3000].encode(), big[3000:].encode()])  # no content-length: chunked
    assert_error(api.post("/v1/cache/store", content=chunks,
                          headers={**AUTH, "content-type": "application/json"}), 413)


def test_unknown_routes_and_methods(api):
    assert_error(api.get("/v1/nothing", headers=AUTH), 404)
    assert_error(api.get("/v1/cache/store", headers=AUTH), 405)
    assert_error(api.delete("/v1/cache?namespace=", headers=AUTH), 422, "namespace")


def test_cache_failures_are_a_503_and_internal_errors_a_plain_500():
    class Broken(EngineBackend):
        async def stats(self):
            raise RuntimeError("secret detail")

    client = make_client(backend=Broken(SemanticCache(HashingEncoder(), DIM)))
    response = client.get("/v1/cache/stats", headers=AUTH)
    assert_error(response, 503, "cache is unavailable")
    assert response.headers["retry-after"] == "1" and "secret detail" not in response.text

    @client.app.get("/boom")
    async def boom():
        raise RuntimeError("secret detail")

    response = client.get("/boom", headers=AUTH)
    assert_error(response, 500, "internal error")
    assert "secret detail" not in response.text


# ----------------------------------------------------------------------------- cache routes
def test_store_lookup_batch_stats_clear(api):
    entry = api.post("/v1/cache/store", json={"prompt": "reset my router password now", "response": "R",
                                              "namespace": "n"}, headers=AUTH).json()["entry_id"]
    one = api.post("/v1/cache/lookup", json={"prompt": "reset my router password now", "namespace": "n"},
                   headers=AUTH).json()
    assert one == {"hit": True, "response": "R", "similarity": 1.0, "exact": True,
                   "matched_prompt": "reset my router password now", "entry_id": entry}
    batch = api.post("/v1/cache/lookup", json={"prompts": ["reset my router password now please",
                                                           "pizza"], "namespace": "n"}, headers=AUTH).json()
    assert [r["hit"] for r in batch["results"]] == [True, False]
    other = api.post("/v1/cache/lookup", json={"prompt": "reset my router password now"}, headers=AUTH)
    assert other.json()["hit"] is False
    stats = api.get("/v1/cache/stats", headers=AUTH).json()
    assert (stats["entries"], stats["lookups"], stats["hits"], stats["misses"]) == (1, 4, 2, 2)
    assert stats["lookup_ms"]["p50"] is not None and stats["lookup_ms"]["p99"] >= stats["lookup_ms"]["p50"]
    assert api.delete("/v1/cache", params={"namespace": "other"}, headers=AUTH).json()["removed"] == 0
    assert api.delete("/v1/cache", params={"namespace": "n"}, headers=AUTH).json() == {"removed": 1,
                                                                                       "namespace": "n"}


# ----------------------------------------------------------------------------- chat proxy
def test_chat_key_covers_model_system_prompt_and_earlier_turns():
    def messages(system, first):
        return [{"role": "system", "content": system}, {"role": "user", "content": first},
                {"role": "assistant", "content": "..."}, {"role": "user", "content": "What are its types?"}]

    base = chat_key(messages("Be brief.", "Tell me about Python"), "m1")
    assert base.prompt == "What are its types?"
    others = [chat_key(messages("Be brief.", "Tell me about snakes"), "m1"),
              chat_key(messages("Be verbose.", "Tell me about Python"), "m1"),
              chat_key(messages("Be brief.", "Tell me about Python"), "m2"),
              chat_key(messages("Be brief.", "Tell me about Python"), "m1", {"tools": [{"x": 1}]})]
    assert len({history_hash(k.history) for k in [base, *others]}) == 5
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert chat_key(parts, "m").prompt == "a\nb"
    assert chat_key([{"role": "assistant", "content": "x"}], "m") is None
    assert chat_key([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "m") is None


def test_chat_key_policy_keys_answer_changing_fields_and_names_why_a_request_bypasses():
    policy = ChatKeyPolicy(["temperature", "model", "n", "tools", "tool_choice"], ["user"])
    assert policy.info() == {"keyed_fields": ["model", "messages", "n", "temperature", "tool_choice", "tools"],
                             "unkeyed_fields": ["stream", "stream_options", "user"], "other_fields": "bypass",
                             "cache_tools": False, "cache_n": False}
    messages = [{"role": "user", "content": "hi there"}]
    cold, _ = policy.key({"model": "m", "messages": messages, "temperature": 0})
    warm, _ = policy.key({"model": "m", "messages": messages, "temperature": 1})
    same, _ = policy.key({"model": "m", "messages": messages, "temperature": 0, "user": "u", "stream": True})
    assert cold.prompt == "hi there" and history_hash(cold.history) == history_hash(same.history)
    assert history_hash(cold.history) != history_hash(warm.history)
    for extra, reason in (({"seed": 1}, "seed are neither keyed"), ({"n": 2}, "n > 1"),
                          ({"tools": [{"type": "function"}]}, "offers tools"),
                          ({"tool_choice": "auto"}, "offers tools")):
        key, why = policy.key({"model": "m", "messages": messages, **extra})
        assert key is None and reason in why
    assert policy.key({"model": "m", "messages": [{"role": "assistant", "content": "x"}]}) == (
        None, "the last message is not a text user message")
    lenient = ChatKeyPolicy(["n", "tools"], [], cache_tools=True, cache_n=True)
    assert lenient.key({"model": "m", "messages": messages, "n": 2, "tool_choice": "auto"})[0] is None  # unknown
    key, why = lenient.key({"model": "m", "messages": messages, "n": 2, "tools": [{"type": "function"}]})
    assert why is None and key.history[0] == {"context": {"model": "m", "n": 2, "tools": [{"type": "function"}]}}


def chat(api, prompt, namespace=None, model="m", earlier=(), **extra):
    messages = [{"role": "system", "content": "Be brief."}, *earlier, {"role": "user", "content": prompt}]
    headers = {**AUTH, **({"x-raycache-namespace": namespace} if namespace else {})}
    return api.post("/v1/chat/completions", json={"model": model, "messages": messages, **extra},
                    headers=headers)


def test_chat_miss_is_forwarded_stored_then_hit(api, upstream):
    first = chat(api, "how do I reset my router password", temperature=0)
    assert first.status_code == 200 and first.headers["x-raycache"] == "miss"
    assert first.json()["choices"][0]["message"]["content"] == "answer to: how do I reset my router password"
    assert first.json()["raycache"]["stored"] is True
    sent = upstream.requests[-1]
    assert sent["auth"] == "Bearer up-key" and "namespace" not in sent["body"]
    assert sent["body"]["temperature"] == 0

    again = chat(api, "how do I reset my router password please", temperature=0)
    assert again.headers["x-raycache"] == "hit" and len(upstream.requests) == 1
    body = again.json()
    assert body["object"] == "chat.completion" and body["usage"]["total_tokens"] == 0
    assert body["choices"][0]["message"]["content"] == "answer to: how do I reset my router password"
    assert body["raycache"]["hit"] is True and body["raycache"]["similarity"] > 0.9


def test_chat_scopes_namespace_model_and_conversation(api, upstream):
    python = [{"role": "user", "content": "Tell me about Python"}, {"role": "assistant", "content": "A language."}]
    snakes = [{"role": "user", "content": "Tell me about snakes"}, {"role": "assistant", "content": "Reptiles."}]
    assert chat(api, "What are its types?", earlier=python).headers["x-raycache"] == "miss"
    assert chat(api, "What are its types?", earlier=snakes).headers["x-raycache"] == "miss"
    assert chat(api, "What are its types?", earlier=python, namespace="t2").headers["x-raycache"] == "miss"
    assert chat(api, "What are its types?", earlier=python, model="m2").headers["x-raycache"] == "miss"
    assert chat(api, "What are its types?", earlier=python).headers["x-raycache"] == "hit"
    assert len(upstream.requests) == 4


@pytest.mark.parametrize("prompt, status", [("please FAIL", 502), ("please TIMEOUT", 504),
                                            ("UNREACHABLE", 502)])
def test_upstream_failures_store_nothing(api, prompt, status):
    assert_error(chat(api, prompt), status, "upstream")
    assert api.get("/v1/cache/stats", headers=AUTH).json()["stores"] == 0


def test_truncated_and_uncacheable_completions_are_not_stored(api, upstream):
    assert chat(api, "TRUNCATE this").json()["raycache"]["stored"] is False
    tail = api.post("/v1/chat/completions", headers=AUTH, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    assert tail.status_code == 200 and tail.headers["x-raycache"] == "bypass"
    assert api.get("/v1/cache/stats", headers=AUTH).json()["stores"] == 0


def test_a_stream_that_is_no_completion_passes_through_unchanged_and_uncached(api, upstream):
    """Cached streaming is in test_service_safety.py; a stream whose chunks hold no choices is
    relayed byte for byte and nothing is stored."""
    response = chat(api, "stream me something", stream=True)
    assert response.status_code == 200 and response.headers["x-raycache"] == "miss"
    assert response.text == 'data: {"x": 1}\n\ndata: [DONE]\n\n'
    assert upstream.requests[-1]["body"]["stream"] is True
    assert api.get("/v1/cache/stats", headers=AUTH).json()["stores"] == 0


def test_chat_still_answers_when_the_cache_fails(upstream):
    class Down(EngineBackend):
        async def lookup(self, *args, **kwargs):
            raise RuntimeError("cache down")

        async def store(self, *args, **kwargs):
            raise RuntimeError("cache down")

    api = make_client(upstream=upstream, backend=Down(SemanticCache(HashingEncoder(), DIM)))
    response = chat(api, "hello there")
    assert response.status_code == 200 and response.headers["x-raycache"] == "miss"
    assert response.json()["raycache"]["stored"] is False


def test_without_upstream_a_miss_is_503():
    assert_error(chat(make_client(), "something new"), 503, "no upstream")


def test_chat_bad_requests(api):
    assert_error(api.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers=AUTH),
                 422, "messages")
    assert_error(api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                          headers=AUTH), 422, "model")
    assert_error(chat(api, "y" * 201), 422, "limit is 200")


def test_upstream_url_forms():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    with pytest.raises(ValueError, match="http"):
        chat_completions_url("h:8000")


# ----------------------------------------------------------------------------- fuzzing
_fuzz_upstream = FakeUpstream()
_fuzz_app = make_client(api_key=None, upstream=_fuzz_upstream).app
schema = schemathesis.openapi.from_asgi("/openapi.json", _fuzz_app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_server_error(case):
    response = case.call()
    assert response.status_code < 500, response.text
