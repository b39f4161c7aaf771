"""Isolation and secrets, no Ray: no lookup returns an entry of another namespace or conversation
(property tests over the engine, the HTTP routes and the chat proxy), the API key guards every
route but /healthz (routes enumerated from the app, raw ASGI paths), and no key reaches a log, a
response or the upstream it does not belong to. The Serve side is in test_faults_service.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Route
from starlette.websockets import WebSocketDisconnect

from raycache.cache import SemanticCache, StaticThreshold
from raycache.data import normalize_text
from raycache.service.api import OPEN_PATHS, ApiSettings, EngineBackend, create_app, key_digest
from raycache.service.upstream import UpstreamClient
from tests.test_cache import DIM, HashingEncoder

KEY = "rc-isolation-KEY-5f1e9a"
UPSTREAM_KEY = "sk-upstream-SECRET-77c2d0"
AUTH = {"authorization": f"Bearer {KEY}"}

# namespaces that look alike but are different strings (case, spaces, full width, zero width,
# Cyrillic a, NUL), and histories that differ in one detail or only in dict key order
NAMESPACES = ["a", "A", "a ", " a", "ａ", "a\u200b", "\u0430", "a\x00", "default", "Default"]
HISTORIES = [None, [], ["hi"], ["hi "], ["Hi"], [{"role": "user", "content": "hi"}],
             [{"content": "hi", "role": "user"}], [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                       "content": "x"}],
             [["hi"]]]
PROMPTS = ["reset my password", "Reset my password!", "what is the capital of france", "bake bread"]


def scope_key(namespace: str, history) -> tuple[str, str]:
    """The test's own notion of a scope: the exact namespace and the canonical history JSON
    (None and [] are both 'no earlier turns'; dict key order does not matter)."""
    return namespace, json.dumps(history or [], sort_keys=True)


# ============================================================================ engine
ops_strategy = st.lists(st.tuples(
    st.booleans(), st.sampled_from(PROMPTS),
    st.one_of(st.sampled_from(NAMESPACES), st.text(min_size=1, max_size=4)),
    st.sampled_from(range(len(HISTORIES)))), max_size=30)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, index=st.sampled_from(["flat", "hnsw"]), doomed=st.sampled_from(NAMESPACES))
def test_engine_lookups_never_cross_scopes(tmp_path_factory, ops, index, doomed):
    """With threshold -1 any entry of the scope is close enough, so a lookup hits exactly when its
    own scope holds an entry, and the entry it returns is from that scope: one by one, batched
    across scopes, after a snapshot round trip and after clearing one namespace."""
    cache = SemanticCache(HashingEncoder(), DIM, index=index, policy=StaticThreshold(-1.0))
    live: dict[tuple, dict[str, int]] = {}  # scope -> normalised prompt -> entry id (same text replaces)

    def check_all(c: SemanticCache, lookups: list) -> None:
        results = c.check_batch([p for p, _, _ in lookups], [ns for _, ns, _ in lookups],
                                [HISTORIES[h] for _, _, h in lookups])
        for (prompt, namespace, h), result in zip(lookups, results):
            scope = scope_key(namespace, HISTORIES[h])
            assert result.hit == bool(live.get(scope))
            if result.hit:
                assert result.entry_id in live[scope].values()

    lookups = []
    for n, (is_store, prompt, namespace, h) in enumerate(ops):
        if is_store:
            entry_id = cache.store(prompt, f"r{n}", namespace, HISTORIES[h])
            live.setdefault(scope_key(namespace, HISTORIES[h]), {})[normalize_text(prompt)] = entry_id
        else:
            check_all(cache, [(prompt, namespace, h)])
            lookups.append((prompt, namespace, h))
    lookups += [(p, ns, h) for p in PROMPTS[:1] for ns in NAMESPACES for h in range(len(HISTORIES))]
    check_all(cache, lookups)

    path = tmp_path_factory.mktemp("iso") / "cache.npz"
    cache.save(path)
    restored = SemanticCache.load(path, HashingEncoder(), index=index, policy=StaticThreshold(-1.0))
    check_all(restored, lookups)

    restored.clear(doomed)
    live = {scope: ids for scope, ids in live.items() if scope[0] != doomed}
    check_all(restored, lookups)


# ============================================================================ HTTP
class RecordingUpstream:
    """OpenAI-compatible endpoint (httpx transport) that records what it receives. Its answer
    names the request's model and system prompt; a prompt containing 'ECHO' gets a 401 whose body
    echoes the Authorization header it was sent (some servers do)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = json.loads(request.content)
        if "ECHO" in str(body["messages"][-1]["content"]):
            return httpx.Response(401, text=f"bad key: {request.headers.get('authorization')}")
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), None)
        return httpx.Response(200, json={
            "id": "up", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": f"{body['model']}|{system}|{body.get('tools')}"}}]})


def make_api(threshold: float = -1.0, upstream: RecordingUpstream | None = None,
             backend: EngineBackend | None = None, **settings_) -> TestClient:
    upstream = upstream or RecordingUpstream()
    client = UpstreamClient("http://upstream.test/v1", api_key=UPSTREAM_KEY,
                            transport=httpx.MockTransport(upstream.handle))
    cache = SemanticCache(HashingEncoder(), DIM, policy=StaticThreshold(threshold))
    app = create_app(backend or EngineBackend(cache), ApiSettings(api_key_sha256=key_digest(KEY), **settings_),
                     client)
    return TestClient(app, raise_server_exceptions=False)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from(PROMPTS), st.sampled_from(NAMESPACES),
                              st.sampled_from(range(len(HISTORIES) - 1))), max_size=15))  # no [["hi"]]
def test_http_lookups_never_cross_scopes(ops):
    api = make_api()
    scope_of: dict[int, tuple] = {}  # entry id -> scope it was stored in
    for is_store, prompt, namespace, h in ops:
        fields = {"prompt": prompt, "namespace": namespace, "history": HISTORIES[h]}
        scope = scope_key(namespace, HISTORIES[h])
        if is_store:
            reply = api.post("/v1/cache/store", json={**fields, "response": "r"}, headers=AUTH)
            assert reply.status_code == 200, reply.text
            scope_of[reply.json()["entry_id"]] = scope
            continue
        found = api.post("/v1/cache/lookup", json=fields, headers=AUTH).json()
        assert found["hit"] == (scope in scope_of.values())  # threshold -1: any entry of the scope
        if found["hit"]:
            assert scope_of[found["entry_id"]] == scope


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["tenant-1", "tenant-2"]), st.booleans(),
                              st.sampled_from(["m1", "m2"]), st.sampled_from([None, "Be brief.", "Be long."]),
                              st.sampled_from([None, [{"type": "function", "function": {"name": "f"}}]]),
                              st.sampled_from(range(3))), min_size=1, max_size=10))
def test_chat_proxy_hits_only_in_the_same_namespace_model_system_prompt_tools_and_turns(ops):
    """The same last user message under different contexts: a hit only where the same context
    (namespace from the header or the body, model, system prompt, tools, earlier turns) stored an
    answer before, and the answer is that context's. (Requests offering tools are cached only with
    chat_cache_tools; by default they bypass: test_service_safety.py.)"""
    api = make_api(chat_cache_tools=True)
    turns = [[], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "hello"}]]
    answered: dict[tuple, str] = {}
    for namespace, in_header, model, system, tools, t in ops:
        messages = ([{"role": "system", "content": system}] if system else []) + turns[t] + \
            [{"role": "user", "content": "What are its types?"}]
        body = {"model": model, "messages": messages, **({"tools": tools} if tools else {})}
        headers = dict(AUTH)
        if in_header:
            headers["x-raycache-namespace"] = namespace
        else:
            body["namespace"] = namespace
        reply = api.post("/v1/chat/completions", json=body, headers=headers)
        assert reply.status_code == 200, reply.text
        context = (namespace, model, system, json.dumps(tools), t)
        assert reply.headers["x-raycache"] == ("hit" if context in answered else "miss")
        content = reply.json()["choices"][0]["message"]["content"]
        assert content == answered.setdefault(context, content) == f"{model}|{system}|{tools}"


# ============================================================================ the API key
async def _asgi_status(app, method: str, path: str, headers: dict[str, str]) -> int:
    """Status of one raw ASGI request (no client-side URL normalisation)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode("utf-8", "surrogateescape"),
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1), "server": ("test", 80),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]}
    sent = {}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]

    await app(scope, receive, send)
    return sent["status"]


def _route_calls(app) -> list[tuple[str, str]]:
    """(method, path) for every route the app has, docs and schema included, plus HEAD/OPTIONS."""
    calls = []
    for route in app.routes:
        assert isinstance(route, Route), f"unexpected route type {type(route).__name__}"
        assert "{" not in route.path, f"path parameters in {route.path}: extend this test"
        for method in sorted((route.methods or {"GET"}) | {"HEAD", "OPTIONS"}):
            calls.append((method, route.path))
    return calls


BAD_CREDENTIALS = {
    "none": {}, "wrong bearer": {"authorization": "Bearer wrong"},
    "empty bearer": {"authorization": "Bearer "}, "key without scheme": {"authorization": KEY},
    "basic scheme": {"authorization": "Basic " + KEY}, "key plus a char": {"x-api-key": KEY + "x"},
    "key minus a char": {"x-api-key": KEY[:-1]}, "key upper-cased": {"x-api-key": KEY.upper()},
    "the key's digest": {"x-api-key": key_digest(KEY)}, "key as cookie": {"cookie": f"api_key={KEY}"},
    "key in another header": {"x-auth-token": KEY},
}


def test_every_route_but_health_needs_the_key():
    app = make_api().app
    calls = _route_calls(app)
    paths = {path for _, path in calls}
    assert {"/v1/cache/lookup", "/v1/cache/store", "/v1/chat/completions", "/v1/cache/stats",
            "/v1/cache", "/healthz", "/openapi.json", "/docs"} <= paths
    opened = set()
    for method, path in calls:
        for name, headers in BAD_CREDENTIALS.items():
            status = asyncio.run(_asgi_status(app, method, path, headers))
            if path in OPEN_PATHS:
                opened.add(path)
                assert status != 401, (method, path, name)
            else:
                assert status == 401, (method, path, name, status)
        if path not in OPEN_PATHS and method not in ("HEAD", "OPTIONS"):
            assert asyncio.run(_asgi_status(app, method, path, AUTH)) != 401, (method, path)
    assert opened == {"/healthz"}
    with pytest.raises(WebSocketDisconnect):  # no websocket route sidesteps the HTTP guard
        with TestClient(app).websocket_connect("/v1/cache/stats"):
            pass


@pytest.mark.parametrize("path", ["/healthz/", "//healthz", "/healthz/../v1/cache/stats",
                                  "/healthz/..%2fv1%2fcache%2fstats", "/HEALTHZ", "/healthz%00",
                                  "/v1/cache/stats#/healthz", "/./v1/cache/stats", "/v1/cache/stats/",
                                  "/v1//cache/stats", "/v1/cache/STATS", "/nonexistent", "/docs/",
                                  "/openapi.json/"])
def test_path_tricks_do_not_open_a_route(path):
    app = make_api().app
    assert asyncio.run(_asgi_status(app, "GET", path, {})) == 401
    assert asyncio.run(_asgi_status(app, "GET", path, {"x-api-key": "wrong"})) == 401


# ============================================================================ secrets
def test_no_key_in_logs_responses_or_the_wrong_place(caplog, capfd):
    """Drive every route with the right key and near-misses, a chat miss, a hit, an upstream that
    echoes its key in an error, and an internal error, logging at DEBUG everywhere: neither key
    appears in a log line, on stdout/stderr or in a response; the upstream sees only its own key."""
    caplog.set_level(logging.DEBUG)
    upstream = RecordingUpstream()

    class Flaky(EngineBackend):
        async def stats(self):
            raise RuntimeError("backend broke")

    api = make_api(threshold=0.9, upstream=upstream)
    flaky = make_api(backend=Flaky(SemanticCache(HashingEncoder(), DIM)))
    texts = []
    for headers in [AUTH, {"x-api-key": KEY}, *BAD_CREDENTIALS.values()]:
        for method, path in _route_calls(api.app):
            texts.append(api.request(method, path, headers=headers).text)
        texts.append(api.post("/v1/cache/lookup", json={"prompt": "reset my password"}, headers=headers).text)
    chat = {"model": "m", "messages": [{"role": "user", "content": "reset my password"}]}
    for prompt in ("reset my password", "reset my password", "please ECHO the key"):
        chat["messages"][-1]["content"] = prompt
        texts.append(api.post("/v1/chat/completions", json=chat, headers=AUTH).text)
    texts.append(flaky.get("/v1/cache/stats", headers=AUTH).text)
    out, err = capfd.readouterr()

    assert any("[redacted]" in t for t in texts) and any("cache is unavailable" in t for t in texts)
    assert [r.headers["authorization"] for r in upstream.requests] == [f"Bearer {UPSTREAM_KEY}"] * 2
    assert all(KEY not in r.content.decode() and KEY not in str(r.headers) for r in upstream.requests)
    assert "backend broke" in caplog.text  # the logs were captured
    for secret in (KEY, UPSTREAM_KEY, hashlib.sha256(UPSTREAM_KEY.encode()).hexdigest()):
        assert secret not in caplog.text and secret not in out + err
        assert not [t for t in texts if secret in t]
    assert key_digest(KEY) not in caplog.text + "".join(texts)
