"""The HTTP API (FastAPI): request/response models, limits, API key, and the routes.

``create_app(backend, settings)`` builds the app over any :class:`CacheBackend`: in the service the
backend forwards to the CacheEngine deployment; :class:`EngineBackend` runs a SemanticCache in
process (tests, embedding without Ray). Every error is JSON ``{"error": {"message", "type"}}`` with a
4xx/5xx status; bad input never yields a 500 or a stack trace.

Routes: ``POST /v1/cache/lookup``, ``POST /v1/cache/store``, ``POST /v1/chat/completions``,
``GET /v1/cache/stats``, ``DELETE /v1/cache``, ``GET /healthz``; OpenAPI at ``/docs``.

Keys: one admin key (its SHA-256 in ``api_key_sha256``) and/or tenant keys (``api_keys``: digest ->
:class:`KeyGrant`); a tenant key only reaches the namespaces it holds (403 otherwise). Failures of
the cache (a replica, the embedder) answer 503 with Retry-After, of the upstream 502, its timeout
504. The chat proxy keys every answer-changing request field (``chat_key_fields``); a request with
a field it does not know, ``n`` > 1 or tools bypasses the cache unless configured; ``stream: true``
is cached too (a miss streams through and is stored, a hit is replayed as SSE chunks).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable, Optional, Protocol, Union

import httpx
import numpy as np
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from raycache.cache.engine import LATENCY_WINDOW, _percentiles
from raycache.cache.scope import MAX_NAMESPACE_CHARS, chat_key, history_hash
from raycache.config import CHAT_KEY_FIELDS, CHAT_UNKEYED_FIELDS
from raycache.service.coalesce import VECTOR_MEMO_SIZE, SingleFlight, VectorMemo
from raycache.service.upstream import (UpstreamClient, UpstreamError, UpstreamTimeout, completion_problem,
                                       is_strict_json)

logger = logging.getLogger(__name__)

HIT_HEADER = "x-raycache"
BYPASS_HEADER = "x-raycache-bypass-reason"
NAMESPACE_HEADER = "x-raycache-namespace"
OPEN_PATHS = ("/healthz",)
MAX_HISTORY_TURNS = 1000
MAX_TTL_S = 10 * 365 * 86400.0
RETRY_AFTER_S = "1"  # seconds a client should wait after a 503 from the cache
PRINCIPAL = "raycache.principal"  # ASGI scope key: the KeyGrant of the request's key
# request fields the proxy handles itself: never part of the key, never "unknown"
CHAT_TRANSPORT_FIELDS = ("model", "messages", "stream", "stream_options")
TOOL_FIELDS = ("tools", "functions")
REPLAY_WORDS_PER_CHUNK = 4  # words per SSE chunk when a cached answer is streamed


# ----------------------------------------------------------------------------- settings
class KeyGrant(BaseModel):
    """What one API key may reach: everything (``admin``) or only ``namespaces``."""

    model_config = ConfigDict(extra="forbid")

    admin: bool = False
    namespaces: list[str] = Field(default_factory=list)

    def holds(self, namespace: Optional[str]) -> bool:
        """May this key read and change ``namespace`` (None = every namespace: admin only)?"""
        return self.admin or (namespace is not None and namespace in self.namespaces)


ADMIN = KeyGrant(admin=True)


class ApiSettings(BaseModel):
    """Limits and wiring of the HTTP API. ``api_key_sha256``: hex SHA-256 of the admin API key;
    ``api_keys``: hex SHA-256 of each tenant key -> its grant (both empty = open); the keys
    themselves never reach the service's configuration."""

    model_config = ConfigDict(extra="forbid")

    api_key_sha256: Optional[str] = None
    api_keys: dict[str, KeyGrant] = Field(default_factory=dict)
    chat_key_fields: list[str] = Field(default_factory=lambda: list(CHAT_KEY_FIELDS))
    chat_unkeyed_fields: list[str] = Field(default_factory=lambda: list(CHAT_UNKEYED_FIELDS))
    chat_cache_tools: bool = False
    chat_cache_n: bool = False
    max_request_bytes: int = 1_000_000
    max_prompt_chars: int = 8000
    max_batch_prompts: int = 256
    upstream: Optional[str] = None
    upstream_timeout_s: float = 60.0
    upstream_api_key_env: str = "UPSTREAM_API_KEY"


def key_digest(api_key: Optional[str]) -> Optional[str]:
    """Hex SHA-256 of an API key; None for an unset or empty key."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


def read_api_keys(path: str) -> dict[str, KeyGrant]:
    """``--api-keys-file``: a JSON object ``{KEY: {"namespaces": [...]}}`` or ``{KEY: {"admin": true}}``
    -> {SHA-256 of KEY: grant}. ValueError naming the problem (never the key)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read the API keys file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object of KEY: grant")
    grants = {}
    for n, (key, grant) in enumerate(data.items(), 1):
        where = f"{path}: key #{n}"
        if not isinstance(key, str) or len(key.strip()) < 8 or key != key.strip():
            raise ValueError(f"{where}: a key must be a string of at least 8 characters, no outer spaces")
        if not isinstance(grant, dict) or set(grant) - {"admin", "namespaces"} or (
                grant.get("admin") is not True and "namespaces" not in grant):
            raise ValueError(f'{where}: expected {{"namespaces": [...]}} or {{"admin": true}}')
        spaces = grant.get("namespaces", [])
        if not isinstance(spaces, list) or not all(
                isinstance(ns, str) and 0 < len(ns) <= MAX_NAMESPACE_CHARS for ns in spaces):
            raise ValueError(f"{where}: namespaces must be a list of 1..{MAX_NAMESPACE_CHARS}-character strings")
        grants[key_digest(key)] = KeyGrant(admin=grant.get("admin") is True, namespaces=spaces)
    return grants


# ----------------------------------------------------------------------------- models
Turn = Union[str, dict[str, Any]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LookupRequest(_Request):
    """One prompt (``prompt``) or a batch (``prompts``) looked up in ``namespace``; ``history``: the
    earlier conversation turns (strings or ``{role, content}`` messages) that scope the lookup."""

    prompt: Optional[str] = Field(None, description="One prompt.")
    prompts: Optional[list[str]] = Field(None, description="A batch of prompts (instead of prompt).")
    namespace: str = Field("default", min_length=1, max_length=MAX_NAMESPACE_CHARS)
    history: Optional[list[Turn]] = Field(None, max_length=MAX_HISTORY_TURNS)


class LookupResponse(BaseModel):
    hit: bool
    response: Optional[str] = None
    similarity: Optional[float] = Field(None, description="Cosine to the nearest entry (1 = exact).")
    matched_prompt: Optional[str] = None
    entry_id: Optional[int] = None
    exact: bool = False


class BatchLookupResponse(BaseModel):
    results: list[LookupResponse]


class StoreRequest(_Request):
    """One entry (``prompt`` + ``response``) or a batch (``prompts`` + ``responses``, the same
    length) stored in ``namespace`` (+ ``history``), each with time to live ``ttl_s``."""

    prompt: Optional[str] = Field(None, description="One prompt (with response).")
    response: Optional[str] = Field(None, description="The response cached for prompt.")
    prompts: Optional[list[str]] = Field(None, description="A batch of prompts (instead of prompt).")
    responses: Optional[list[str]] = Field(None, description="One response per prompt of the batch.")
    namespace: str = Field("default", min_length=1, max_length=MAX_NAMESPACE_CHARS)
    history: Optional[list[Turn]] = Field(None, max_length=MAX_HISTORY_TURNS)
    ttl_s: Optional[float] = Field(None, gt=0, le=MAX_TTL_S, description="Time to live, seconds.")


class StoreResponse(BaseModel):
    entry_id: int


class BatchStoreResponse(BaseModel):
    entry_ids: list[int]


class ClearResponse(BaseModel):
    removed: int
    namespace: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Any = None


class ChatCompletionRequest(BaseModel):
    """OpenAI chat completion request; unknown fields are forwarded upstream untouched.
    ``namespace`` (or the ``x-raycache-namespace`` header) is raycache's and is not forwarded."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(..., min_length=1)
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    n: int = Field(1, ge=1)
    namespace: Optional[str] = Field(None, min_length=1, max_length=MAX_NAMESPACE_CHARS)


class HealthResponse(BaseModel):
    status: str


# ----------------------------------------------------------------------------- backends
class CacheBackend(Protocol):
    """What the routes need from the cache (the CacheEngine deployment, or EngineBackend).
    ``store_batch`` is optional: the routes fall back to one ``store`` per prompt without it."""

    async def lookup(self, prompts: list[str], namespace: str = "default",
                     histories: Optional[list] = None) -> list[dict]: ...

    async def store(self, prompt: str, response: str, namespace: str = "default",
                    history: Optional[list] = None, ttl_s: Optional[float] = None) -> int: ...

    async def store_batch(self, prompts: list[str], responses: list[str], namespace: str = "default",
                          history: Optional[list] = None, ttl_s: Optional[float] = None) -> list[int]: ...

    async def stats(self) -> dict: ...

    async def clear(self, namespace: Optional[str] = None) -> int: ...


Embedded = Union[np.ndarray, tuple]  # vectors [n, dim], or (vectors, tail keys beyond the window)


class EngineBackend:
    """A SemanticCache behind the async backend interface.

    ``embed``: async texts -> float32 [n, dim], or (vectors, tail keys) from an encoder with a
    window (the Serve embedder's ``embed_with_tails``); default: the cache's own encoder in a worker
    thread. Embedding runs outside the cache lock, so concurrent requests' prompts reach a batching
    embedder together, and every cache call runs in a worker thread (``asyncio.to_thread``), never
    on the event loop: a search, an eviction or a snapshot holding the lock blocks no other request.

    ``stats()`` adds ``request_path_ms``: percentiles of this replica's embed calls (the hop to
    the embedder and its batching wait included), cache lookup calls (both halves, worker-thread
    hops included) and cache store calls, so a lookup's time can be split into embedding, cache
    work and, by difference with the client's latency, the HTTP and Serve hops.

    One embedding per prompt: the vectors of recently embedded prompts are kept
    (:class:`raycache.service.coalesce.VectorMemo`, ``memo_size`` texts), so the store after a
    missed lookup of the same text (the chat proxy's miss, a cache-aside client) reuses the
    lookup's vector instead of embedding the prompt again.
    """

    def __init__(self, cache: Any, embed: Optional[Callable[[list[str]], Awaitable[Embedded]]] = None,
                 memo_size: int = VECTOR_MEMO_SIZE):
        self.cache = cache
        self._embed = embed or self._embed_locally
        self.memo = VectorMemo(memo_size)
        # where a request's milliseconds go on this replica (the last LATENCY_WINDOW calls each)
        self._timings = {name: deque(maxlen=LATENCY_WINDOW) for name in ("embed", "lookup", "store")}

    def _timed(self, name: str, started: float) -> None:
        self._timings[name].append((time.perf_counter() - started) * 1000.0)

    async def _embed_locally(self, texts: list[str]) -> Embedded:
        if self.cache.encoder is None:
            raise RuntimeError("EngineBackend needs an embed function or a cache with an encoder")
        return await asyncio.to_thread(self.cache.embed, texts)

    async def vectors(self, texts: list[str]) -> tuple[np.ndarray, Optional[list[str]]]:
        """(vectors [n, dim], tail keys or None = the cache's own) of ``texts``: remembered ones
        from the memo, the others embedded in one call (and remembered)."""
        rows: list[Optional[np.ndarray]] = [None] * len(texts)
        tails: list[Optional[str]] = [None] * len(texts)
        missing = []
        for i, text in enumerate(texts):
            known = self.memo.get(text)
            if known is None:
                missing.append(i)
            else:
                rows[i], tails[i] = known
        if missing:
            new_texts = [texts[i] for i in missing]
            started = time.perf_counter()
            embedded = await self._embed(new_texts)
            self._timed("embed", started)
            vecs, new_tails = embedded if isinstance(embedded, tuple) else (embedded, None)
            vecs = np.asarray(vecs, dtype=np.float32)
            if vecs.ndim != 2 or len(vecs) != len(missing):
                raise ValueError(f"the embedder answered {vecs.shape} for {len(missing)} texts")
            if new_tails is not None:
                new_tails = ["" if t is None else str(t) for t in new_tails]
                if len(new_tails) != len(missing):
                    raise ValueError(f"the embedder answered {len(new_tails)} tail keys for {len(missing)} texts")
            self.memo.put(new_texts, vecs, new_tails)
            for row, i in enumerate(missing):
                rows[i], tails[i] = vecs[row], None if new_tails is None else new_tails[row]
        if not texts:
            return np.zeros((0, self.cache.dim), np.float32), []
        known_tails = None if any(t is None for t in tails) else [str(t) for t in tails]
        return np.stack(rows).astype(np.float32, copy=False), known_tails

    async def lookup(self, prompts: list[str], namespace: str = "default",
                     histories: Optional[list] = None) -> list[dict]:
        started = time.perf_counter()
        pending = await asyncio.to_thread(self.cache.begin_lookup, prompts, namespace, histories)
        cache_s = time.perf_counter() - started
        vectors, tails = await self.vectors(pending.texts) if pending.need else (None, [])
        started = time.perf_counter()
        results = await asyncio.to_thread(self.cache.complete_lookup, pending, vectors, tails)
        self._timings["lookup"].append((cache_s + time.perf_counter() - started) * 1000.0)
        return [r.to_dict() for r in results]

    async def store(self, prompt: str, response: str, namespace: str = "default",
                    history: Optional[list] = None, ttl_s: Optional[float] = None) -> int:
        return (await self.store_batch([prompt], [response], namespace, history, ttl_s))[0]

    async def store_batch(self, prompts: list[str], responses: list[str], namespace: str = "default",
                          history: Optional[list] = None, ttl_s: Optional[float] = None) -> list[int]:
        """Store ``responses[i]`` for ``prompts[i]``, all in ``namespace`` (+ ``history``), with one
        embedding call for the prompts the memo does not hold; atomic (all stored or none)."""
        vectors, tails = await self.vectors(list(prompts))
        histories = None if history is None else [history] * len(prompts)
        started = time.perf_counter()
        entry_ids = await asyncio.to_thread(self.cache.store_batch, prompts, responses, namespace,
                                            histories, ttl_s, vectors, tails)
        self._timed("store", started)
        return entry_ids

    async def stats(self) -> dict:
        stats = await asyncio.to_thread(self.cache.stats)
        return {**stats, "vectors_reused": self.memo.reused,
                "request_path_ms": {f"{name}_call": _percentiles(samples)
                                    for name, samples in self._timings.items()}}

    async def clear(self, namespace: Optional[str] = None) -> int:
        return await asyncio.to_thread(self.cache.clear, namespace)


# ----------------------------------------------------------------------------- errors
def error_response(status: int, message: str, kind: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status, headers=headers)


_KIND = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed",
         413: "request_too_large", 422: "invalid_request", 502: "upstream_error",
         503: "unavailable", 504: "upstream_timeout"}


def _fail(status: int, message: str, headers: Optional[dict] = None) -> HTTPException:
    return HTTPException(status_code=status, detail=message, headers=headers)


def _upstream_failure(exc: UpstreamError) -> HTTPException:
    """504 for a timeout, else 502 (with the upstream's Retry-After when it sent one)."""
    if isinstance(exc, UpstreamTimeout):
        return _fail(504, str(exc))
    return _fail(502, str(exc), {"retry-after": exc.retry_after} if exc.retry_after else None)


async def _from_backend(call: Awaitable[Any], what: str) -> Any:
    """Await a cache backend call; its failure (a replica or the embedder down, overloaded or
    restarting) is a 503 with Retry-After, not a 500. Bad input never gets here (validated first)."""
    try:
        return await call
    except HTTPException:
        raise
    except Exception as exc:
        logger.error("cache %s failed: %s", what, type(exc).__name__, exc_info=exc)
        raise _fail(503, f"the cache is unavailable ({what} failed: {type(exc).__name__}); retry",
                    {"retry-after": RETRY_AFTER_S}) from None


def _describe_validation(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "request body is not valid JSON"
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return 422, "request body must be a JSON object (Content-Type: application/json)"
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return 422, "; ".join(parts)


# ----------------------------------------------------------------------------- middleware
class RequestGuard:
    """ASGI middleware: the API key on every route but OPEN_PATHS, then the body size limit.

    The key's grant (admin, or the namespaces it holds) is put in the ASGI scope under
    ``PRINCIPAL`` for the routes to check. The body is read here (at most ``max_request_bytes``) and
    replayed to the app, so chunked bodies are limited too. Keys are compared as SHA-256 digests
    (the admin key in constant time) and never logged.
    """

    def __init__(self, app: Any, settings: ApiSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        grant = self._grant(headers)
        if grant is None and path not in OPEN_PATHS:
            await error_response(401, "missing or invalid API key (send 'Authorization: Bearer KEY' "
                                      "or 'x-api-key: KEY')", "unauthorized",
                                 {"www-authenticate": "Bearer"})(scope, receive, send)
            return
        scope[PRINCIPAL] = grant
        limit = self.settings.max_request_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                await self._too_large(scope, receive, send)
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _grant(self, headers: dict[str, str]) -> Optional[KeyGrant]:
        """The grant of the request's key: ADMIN when the service has no keys; None when the key
        is missing or wrong."""
        settings = self.settings
        if not settings.api_key_sha256 and not settings.api_keys:
            return ADMIN
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        if not key:
            return None
        digest = key_digest(key)
        if settings.api_key_sha256 and hmac.compare_digest(digest, settings.api_key_sha256):
            return ADMIN
        return settings.api_keys.get(digest)

    async def _too_large(self, scope: dict, receive: Callable, send: Callable) -> None:
        await error_response(413, f"request body exceeds {self.settings.max_request_bytes} bytes",
                             "request_too_large")(scope, receive, send)


# ----------------------------------------------------------------------------- the app
def create_app(backend: CacheBackend, settings: ApiSettings,
               upstream: Optional[UpstreamClient] = None) -> FastAPI:
    """The FastAPI app over ``backend``. ``upstream`` serves chat-completion misses; None = a client
    of ``settings.upstream`` (key from env var ``settings.upstream_api_key_env``), made on first
    use and closed at app shutdown. An injected client is the caller's to close."""
    clients = {"upstream": upstream}
    flights = SingleFlight()  # identical chat misses in flight in this process

    def _need_upstream() -> UpstreamClient:
        if clients["upstream"] is None:
            if not settings.upstream:
                raise _fail(503, "cache miss and no upstream configured (start the service with "
                                 "--upstream URL)")
            clients["upstream"] = UpstreamClient(settings.upstream,
                                                 os.environ.get(settings.upstream_api_key_env),
                                                 settings.upstream_timeout_s)
        return clients["upstream"]

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if upstream is None and clients["upstream"] is not None:
            await clients["upstream"].aclose()
            clients["upstream"] = None

    app = FastAPI(title="raycache", version="0.1.0", lifespan=lifespan,
                  description="Semantic prompt cache: look prompts up, store responses, or use the "
                              "OpenAI-compatible proxy. Send 'Authorization: Bearer KEY' when the "
                              "service has an API key.")
    app.add_middleware(RequestGuard, settings=settings)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _describe_validation(exc)
        return error_response(status, message, _KIND[status])

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), _KIND.get(exc.status_code, "error"),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error serving %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error", "internal_error")

    def check_text(text: str, what: str) -> None:
        if not is_strict_json(text):  # the encoder and the JSON answers cannot take it
            raise _fail(422, f"{what} is not valid unicode (it holds a lone surrogate such as \\ud800)")

    def check_prompt(prompt: str, what: str = "prompt") -> None:
        check_text(prompt, what)
        if not prompt.strip():
            raise _fail(422, f"{what} must not be empty")
        if len(prompt) > settings.max_prompt_chars:
            raise _fail(422, f"{what} is {len(prompt)} characters; the limit is {settings.max_prompt_chars}")

    def authorize(request: Request, namespace: Optional[str]) -> None:
        """403 unless the request's key holds ``namespace`` (None: every namespace, admin only)."""
        grant = request.scope.get(PRINCIPAL) or ADMIN
        if not grant.holds(namespace):
            what = "every namespace (an admin key)" if namespace is None else f"namespace {namespace!r}"
            raise _fail(403, f"this API key does not hold {what}")

    keyed_fields = frozenset(settings.chat_key_fields) - set(CHAT_TRANSPORT_FIELDS)
    unkeyed_fields = (frozenset(settings.chat_unkeyed_fields) | {"stream", "stream_options"}) - keyed_fields
    chat_key_info = {
        "keyed_fields": ["model", "messages", *sorted(keyed_fields)],
        "unkeyed_fields": sorted(unkeyed_fields),
        "other_fields": "bypass",
        "cache_tools": settings.chat_cache_tools, "cache_n": settings.chat_cache_n,
    }

    def chat_cache_key(body: dict) -> tuple[Optional[Any], Optional[str]]:
        """(ChatKey, None) for a cacheable request, else (None, why it bypasses the cache)."""
        fields = set(body) - set(CHAT_TRANSPORT_FIELDS)
        unknown = sorted(fields - keyed_fields - unkeyed_fields)
        if unknown:
            return None, (f"request field(s) {', '.join(unknown)[:200]} are neither keyed nor known "
                          f"to leave the answer unchanged (serve --chat-key-fields / --chat-unkeyed-fields)")
        if body.get("n", 1) != 1 and not settings.chat_cache_n:
            return None, "n > 1 (serve --chat-cache-n caches it)"
        if not settings.chat_cache_tools and (
                any(body.get(f) for f in TOOL_FIELDS) or
                body.get("tool_choice", "none") != "none" or body.get("function_call", "none") != "none"):
            return None, "the request offers tools (serve --chat-cache-tools caches it)"
        key = chat_key(body["messages"], body["model"], {f: body[f] for f in sorted(fields & keyed_fields)})
        if key is None:
            return None, "the last message is not a text user message"
        return key, None

    @app.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz() -> dict:
        """Liveness (no API key needed)."""
        return {"status": "ok"}

    @app.post("/v1/cache/lookup", response_model=Union[LookupResponse, BatchLookupResponse],
              tags=["cache"])
    async def lookup(req: LookupRequest, request: Request) -> dict:
        """Look up ``prompt`` (-> one result) or ``prompts`` (-> ``{results: [...]}``)."""
        authorize(request, req.namespace)
        if (req.prompt is None) == (req.prompts is None):
            raise _fail(422, "send exactly one of 'prompt' or 'prompts'")
        prompts = [req.prompt] if req.prompt is not None else req.prompts
        if not prompts:
            raise _fail(422, "prompts must not be empty")
        if len(prompts) > settings.max_batch_prompts:
            raise _fail(422, f"{len(prompts)} prompts in one batch; the limit is {settings.max_batch_prompts}")
        for i, p in enumerate(prompts):
            check_prompt(p, "prompt" if req.prompt is not None else f"prompts[{i}]")
        histories = None if req.history is None else [req.history] * len(prompts)
        check_history(req.history)
        results = await _from_backend(backend.lookup(prompts, req.namespace, histories), "lookup")
        return results[0] if req.prompt is not None else {"results": results}

    @app.post("/v1/cache/store", response_model=Union[StoreResponse, BatchStoreResponse], tags=["cache"])
    async def store(req: StoreRequest, request: Request) -> dict:
        """Cache ``response`` for ``prompt`` (-> ``{entry_id}``), or ``responses[i]`` for each of
        ``prompts`` (-> ``{entry_ids: [...]}``, all stored or none), in ``namespace`` (+
        ``history``), optional ``ttl_s``."""
        authorize(request, req.namespace)
        single = req.prompt is not None or req.response is not None
        if single == (req.prompts is not None or req.responses is not None):
            raise _fail(422, "send exactly one of 'prompt' + 'response' or 'prompts' + 'responses'")
        if single:
            if req.prompt is None or req.response is None:
                raise _fail(422, f"'{'response' if req.response is None else 'prompt'}' is missing "
                                 f"(a store needs both 'prompt' and 'response')")
            check_prompt(req.prompt)
            check_text(req.response, "response")
            check_history(req.history)
            entry_id = await _from_backend(
                backend.store(req.prompt, req.response, req.namespace, req.history, req.ttl_s), "store")
            return {"entry_id": entry_id}
        if req.prompts is None or req.responses is None:
            raise _fail(422, f"'{'responses' if req.responses is None else 'prompts'}' is missing "
                             f"(a batch store needs both 'prompts' and 'responses')")
        if not req.prompts:
            raise _fail(422, "prompts must not be empty")
        if len(req.prompts) > settings.max_batch_prompts:
            raise _fail(422, f"{len(req.prompts)} prompts in one batch; the limit is {settings.max_batch_prompts}")
        if len(req.responses) != len(req.prompts):
            raise _fail(422, f"{len(req.responses)} responses for {len(req.prompts)} prompts "
                             f"(one response per prompt)")
        for i, (p, r) in enumerate(zip(req.prompts, req.responses)):
            check_prompt(p, f"prompts[{i}]")
            check_text(r, f"responses[{i}]")
        check_history(req.history)
        batch = getattr(backend, "store_batch", None)
        if batch is not None:
            call = batch(req.prompts, req.responses, req.namespace, req.history, req.ttl_s)
        else:  # a backend without batches: one store each
            async def call_each() -> list[int]:
                return [await backend.store(p, r, req.namespace, req.history, req.ttl_s)
                        for p, r in zip(req.prompts, req.responses)]
            call = call_each()
        return {"entry_ids": await _from_backend(call, "store")}

    @app.get("/v1/cache/stats", tags=["cache"])
    async def stats(request: Request) -> dict:
        """Entries, lookups, hits, misses, evictions, expirations, lookup latency percentiles (ms),
        and which chat request fields are keyed (``chat_key``). Admin keys only."""
        authorize(request, None)
        return {**await _from_backend(backend.stats(), "stats"), "chat_key": chat_key_info}

    @app.delete("/v1/cache", response_model=ClearResponse, tags=["cache"])
    async def clear(request: Request, namespace: Optional[str] = Query(
            None, min_length=1, max_length=MAX_NAMESPACE_CHARS)) -> dict:
        """Remove every entry (admin keys only), or only those of ``namespace``."""
        authorize(request, namespace)
        return {"removed": await _from_backend(backend.clear(namespace), "clear"), "namespace": namespace}

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(req: ChatCompletionRequest, request: Request,
                               x_raycache_namespace: Optional[str] = Header(None)):
        """OpenAI-compatible proxy: a cache hit answers at once (header ``x-raycache: hit`` and a
        ``raycache`` field; ``stream: true`` gets it as SSE chunks); a miss is forwarded upstream,
        stored and returned (``x-raycache: miss``; streamed through when ``stream: true``). The key
        holds the model, every message and each answer-changing field (``chat_key`` in
        ``/v1/cache/stats``). A request with ``n`` > 1, tools, an unknown field, or not ending in a
        text user message passes through uncached (``x-raycache: bypass`` and
        ``x-raycache-bypass-reason``). Upstream error: 502; timeout: 504."""
        namespace = x_raycache_namespace or req.namespace or "default"
        if not 0 < len(namespace) <= MAX_NAMESPACE_CHARS:
            raise _fail(422, f"namespace must have 1..{MAX_NAMESPACE_CHARS} characters")
        authorize(request, namespace)
        body = req.model_dump(exclude={"namespace"}, exclude_unset=True)
        if not is_strict_json(body):
            raise _fail(422, "the request holds NaN/Infinity or invalid unicode (lone surrogates) and "
                             "cannot be forwarded")
        key, bypass = chat_cache_key(body)
        if key is not None:
            check_prompt(key.prompt, "the last user message")
        else:
            return await _pass_through(body, req.stream, bypass)

        found, answer = await _answer_from_cache(key, namespace, req, body)
        if answer is not None:
            return answer
        info = {"hit": False, "similarity": found["similarity"]}
        if req.stream:
            return await _stream_and_store(body, key, namespace, info, req.n)
        # concurrent identical misses: the first calls the upstream, the others wait for its
        # stored answer (and call the upstream themselves only when it stored none)
        async with flights.join((namespace, key.prompt, history_hash(key.history))) as leader:
            if not leader:
                found, answer = await _answer_from_cache(key, namespace, req, body)
                if answer is not None:
                    return answer
                info["similarity"] = found["similarity"]
            completion = await _forward(body)
            contents = _answer_contents(completion.get("choices"), req.n)
            entry_id = None
            if contents is not None:
                entry_id = await _store_answer(key, namespace, contents)
        completion["raycache"] = {**info, "stored": entry_id is not None, "entry_id": entry_id}
        return JSONResponse(completion, headers={HIT_HEADER: "miss"})

    async def _answer_from_cache(key: Any, namespace: str, req: ChatCompletionRequest,
                                 body: dict) -> tuple[dict, Optional[Any]]:
        """(the lookup's result, the cached answer as a response or None on a miss)."""
        try:
            found = (await backend.lookup([key.prompt], namespace, [key.history]))[0]
        except Exception as exc:  # a proxy keeps answering when the cache fails
            logger.error("cache lookup failed (%s); forwarding upstream", type(exc).__name__)
            return {"hit": False, "similarity": None}, None
        if found["hit"]:
            contents = _cached_contents(found["response"], req.n)
            if contents is not None:
                if req.stream:
                    return found, _replay_stream(req.model, found, contents, body.get("stream_options"))
                return found, JSONResponse(_cached_completion(req.model, found, contents),
                                           headers={HIT_HEADER: "hit"})
        return found, None

    def check_history(history: Optional[list]) -> None:
        if history is not None and not is_strict_json(history):
            raise _fail(422, "history holds NaN/Infinity or invalid unicode (lone surrogates)")

    async def _store_answer(key: Any, namespace: str, contents: list[str]) -> Optional[int]:
        """Store a completion's answer(s); None when the cache could not (the caller still gets
        its answer)."""
        response = contents[0] if len(contents) == 1 else json.dumps({"choices": contents})
        try:
            return await backend.store(key.prompt, response, namespace, key.history)
        except Exception as exc:
            logger.error("caching the completion failed (%s)", type(exc).__name__)
            return None

    async def _forward(body: dict) -> dict:
        try:
            return await _need_upstream().chat_completion(body)
        except UpstreamError as exc:
            raise _upstream_failure(exc) from None

    async def _open_stream(body: dict):
        try:
            return await _need_upstream().open_stream(body)
        except UpstreamError as exc:
            raise _upstream_failure(exc) from None

    async def _pass_through(body: dict, stream: bool, reason: Optional[str]):
        headers = {HIT_HEADER: "bypass",
                   BYPASS_HEADER: (reason or "")[:300].encode("ascii", "backslashreplace").decode()}
        if not stream:
            return JSONResponse(await _forward(body), headers=headers)
        response = await _open_stream(body)
        return StreamingResponse(response.aiter_bytes(), status_code=response.status_code,
                                 media_type=response.headers.get("content-type", "text/event-stream"),
                                 headers=headers, background=BackgroundTask(response.aclose))

    async def _stream_and_store(body: dict, key: Any, namespace: str, info: dict, n: int):
        """A streamed miss: the upstream's SSE passes through line by line while the answer is
        assembled; a complete answer (every choice finished with 'stop', no tool calls) is stored
        before the final ``data: [DONE]`` goes out, so the next request can hit it."""
        response = await _open_stream(body)
        if "text/event-stream" not in response.headers.get("content-type", ""):
            headers = {HIT_HEADER: "bypass", BYPASS_HEADER: "the upstream did not stream (no text/event-stream)"}
            return StreamingResponse(response.aiter_bytes(), status_code=response.status_code,
                                     media_type=response.headers.get("content-type"), headers=headers,
                                     background=BackgroundTask(response.aclose))
        assembler = StreamAssembler(n)

        async def relay():
            pending = b""
            try:
                async for chunk in response.aiter_bytes():
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if assembler.feed(line) == "done":
                            contents = assembler.contents()
                            if contents is not None:
                                await _store_answer(key, namespace, contents)
                        yield line + b"\n"
                if pending:
                    assembler.feed(pending)
                    yield pending
                if not assembler.done and assembler.contents() is not None:  # ended without [DONE]
                    await _store_answer(key, namespace, assembler.contents())
            except httpx.HTTPError as exc:  # the upstream broke off mid-stream: say so, store nothing
                logger.error("upstream stream failed mid-way: %s", type(exc).__name__)
                error = {"error": {"message": f"upstream stream failed: {type(exc).__name__}",
                                   "type": "upstream_timeout" if isinstance(exc, httpx.TimeoutException)
                                   else "upstream_error"}}
                yield b"\n\ndata: " + json.dumps(error).encode() + b"\n\n"
            finally:
                await response.aclose()

        return StreamingResponse(relay(), status_code=response.status_code, media_type="text/event-stream",
                                 headers={HIT_HEADER: "miss"})

    return app


class StreamAssembler:
    """Reads an OpenAI chat-completion SSE stream line by line and assembles each choice's text.

    ``feed(line)`` returns "done" at ``data: [DONE]``. ``contents()``: the ``n`` answers when the
    stream is complete and cacheable (every choice finished with 'stop', text only), else None.
    """

    def __init__(self, n: int = 1):
        self.n = n
        self.parts: dict[int, list[str]] = {}
        self.finish: dict[int, Any] = {}
        self.cacheable = True
        self.done = False

    def feed(self, line: bytes) -> Optional[str]:
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith("data:"):
            return None
        data = text[5:].strip()
        if data == "[DONE]":
            self.done = True
            return "done"
        try:
            chunk = json.loads(data)
        except ValueError:
            self.cacheable = False
            return None
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not isinstance(choices, list) or "error" in chunk:
            self.cacheable = False
            return None
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
                self.cacheable = False
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict) or delta.get("tool_calls") or delta.get("function_call"):
                self.cacheable = False
                continue
            content = delta.get("content")
            if isinstance(content, str):
                self.parts.setdefault(index, []).append(content)
            elif content is not None:
                self.cacheable = False
            if choice.get("finish_reason") is not None:
                self.finish[index] = choice["finish_reason"]
        return None

    def contents(self) -> Optional[list[str]]:
        if not self.cacheable or sorted(self.finish) != list(range(self.n)):
            return None
        if any(reason != "stop" for reason in self.finish.values()):
            return None
        answers = ["".join(self.parts.get(i, [])) for i in range(self.n)]
        if not all(a.strip() and is_strict_json(a) for a in answers):
            return None
        return answers


def _answer_contents(choices: Any, n: int) -> Optional[list[str]]:
    """The ``n`` text answers of a completion's choices when it can be cached (each finished with
    'stop' or no reason, text content, no tool calls), else None."""
    if not isinstance(choices, list) or len(choices) != n:
        return None
    out = []
    for choice in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index", 0), int) else 0):
        message = choice.get("message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        if (not isinstance(content, str) or not content.strip() or message.get("tool_calls")
                or message.get("function_call") or choice.get("finish_reason") not in (None, "stop")):
            return None
        out.append(content)
    return out


def _cached_contents(response: str, n: int) -> Optional[list[str]]:
    """The ``n`` answers a stored response holds (one string; for n > 1, ``{"choices": [...]}``);
    None when it does not hold ``n`` (then the request is treated as a miss)."""
    if n == 1:
        return [response]
    try:
        data = json.loads(response)
    except ValueError:
        return None
    choices = data.get("choices") if isinstance(data, dict) else None
    if isinstance(choices, list) and len(choices) == n and all(isinstance(c, str) for c in choices):
        return choices
    return None


def _hit_info(found: dict) -> dict:
    return {"hit": True, "similarity": found["similarity"], "exact": found["exact"],
            "matched_prompt": found["matched_prompt"], "entry_id": found["entry_id"]}


def _cached_completion(model: str, found: dict, contents: list[str]) -> dict:
    """An OpenAI chat.completion object answering from the cache (token usage 0: no LLM call)."""
    return {
        "id": f"chatcmpl-raycache-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop", "logprobs": None} for i, content in enumerate(contents)],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "raycache": _hit_info(found),
    }


def replay_pieces(text: str, words: int = REPLAY_WORDS_PER_CHUNK) -> list[str]:
    """``text`` cut into pieces of a few words (whitespace kept) whose concatenation is ``text``."""
    tokens = re.findall(r"\s*\S+|\s+$", text)
    return ["".join(tokens[i:i + words]) for i in range(0, len(tokens), words)] or [text]


def sse_event(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _replay_stream(model: str, found: dict, contents: list[str], stream_options: Any) -> StreamingResponse:
    """A cache hit for ``stream: true``: OpenAI ``chat.completion.chunk`` SSE events (a role chunk,
    the text in pieces, a finish chunk, the usage chunk if ``stream_options.include_usage``),
    then ``data: [DONE]``."""
    base = {"id": f"chatcmpl-raycache-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}

    def chunk(index: int, delta: dict, finish: Optional[str] = None) -> dict:
        return {**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                     "logprobs": None}]}

    def events():
        for index, content in enumerate(contents):
            yield sse_event({**chunk(index, {"role": "assistant", "content": ""}), "raycache": _hit_info(found)})
            for piece in replay_pieces(content):
                yield sse_event(chunk(index, {"content": piece}))
            yield sse_event(chunk(index, {}, "stop"))
        if isinstance(stream_options, dict) and stream_options.get("include_usage"):
            yield sse_event({**base, "choices": [],
                             "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={HIT_HEADER: "hit"})
