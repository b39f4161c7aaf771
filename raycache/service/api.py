"""The HTTP API (FastAPI): request/response models, limits, API key, and the routes.

``create_app(backend, settings)`` builds the app over any :class:`CacheBackend`: in the service the
backend forwards to the CacheEngine deployment; :class:`EngineBackend` runs a SemanticCache in
process (tests, embedding without Ray). Every error is JSON ``{"error": {"message", "type"}}`` with a
4xx/5xx status; bad input never yields a 500 or a stack trace.

Routes: ``POST /v1/cache/lookup``, ``POST /v1/cache/store``, ``POST /v1/chat/completions``,
``GET /v1/cache/stats``, ``DELETE /v1/cache``, ``GET /healthz``; OpenAPI at ``/docs``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable, Optional, Protocol, Union

import numpy as np
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from raycache.cache.scope import MAX_NAMESPACE_CHARS, chat_key
from raycache.service.upstream import UpstreamClient, UpstreamError, UpstreamTimeout, is_strict_json

logger = logging.getLogger(__name__)

HIT_HEADER = "x-raycache"
NAMESPACE_HEADER = "x-raycache-namespace"
OPEN_PATHS = ("/healthz",)
MAX_HISTORY_TURNS = 1000
MAX_TTL_S = 10 * 365 * 86400.0
# request fields that change what a chat completion says, so they join the scope
CHAT_CONTEXT_FIELDS = ("tools", "tool_choice", "functions", "function_call", "response_format")


# ----------------------------------------------------------------------------- settings
class ApiSettings(BaseModel):
    """Limits and wiring of the HTTP API. ``api_key_sha256``: hex SHA-256 of the API key (None =
    open); the key itself never reaches the service's configuration."""

    model_config = ConfigDict(extra="forbid")

    api_key_sha256: Optional[str] = None
    max_request_bytes: int = 1_000_000
    max_prompt_chars: int = 8000
    max_batch_prompts: int = 256
    upstream: Optional[str] = None
    upstream_timeout_s: float = 60.0
    upstream_api_key_env: str = "UPSTREAM_API_KEY"


def key_digest(api_key: Optional[str]) -> Optional[str]:
    """Hex SHA-256 of an API key; None for an unset or empty key."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


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
    prompt: str
    response: str
    namespace: str = Field("default", min_length=1, max_length=MAX_NAMESPACE_CHARS)
    history: Optional[list[Turn]] = Field(None, max_length=MAX_HISTORY_TURNS)
    ttl_s: Optional[float] = Field(None, gt=0, le=MAX_TTL_S, description="Time to live, seconds.")


class StoreResponse(BaseModel):
    entry_id: int


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
    """What the routes need from the cache (the CacheEngine deployment, or EngineBackend)."""

    async def lookup(self, prompts: list[str], namespace: str = "default",
                     histories: Optional[list] = None) -> list[dict]: ...

    async def store(self, prompt: str, response: str, namespace: str = "default",
                    history: Optional[list] = None, ttl_s: Optional[float] = None) -> int: ...

    async def stats(self) -> dict: ...

    async def clear(self, namespace: Optional[str] = None) -> int: ...


class EngineBackend:
    """A SemanticCache behind the async backend interface.

    ``embed``: async texts -> float32 [n, dim] (the Serve embedder); default: the cache's own
    encoder in a worker thread. Embedding runs outside the cache lock, so concurrent requests'
    prompts reach a batching embedder together.
    """

    def __init__(self, cache: Any, embed: Optional[Callable[[list[str]], Awaitable[np.ndarray]]] = None):
        self.cache = cache
        self._embed = embed or self._embed_locally

    async def _embed_locally(self, texts: list[str]) -> np.ndarray:
        if self.cache.encoder is None:
            raise RuntimeError("EngineBackend needs an embed function or a cache with an encoder")
        return await asyncio.to_thread(self.cache.encoder.encode, texts)

    async def lookup(self, prompts: list[str], namespace: str = "default",
                     histories: Optional[list] = None) -> list[dict]:
        pending = self.cache.begin_lookup(prompts, namespace, histories)
        vectors = await self._embed(pending.texts) if pending.need else None
        return [r.to_dict() for r in self.cache.complete_lookup(pending, vectors)]

    async def store(self, prompt: str, response: str, namespace: str = "default",
                    history: Optional[list] = None, ttl_s: Optional[float] = None) -> int:
        vectors = await self._embed([prompt])
        return self.cache.store(prompt, response, namespace, history, ttl_s, vector=vectors[0])

    async def stats(self) -> dict:
        return self.cache.stats()

    async def clear(self, namespace: Optional[str] = None) -> int:
        return self.cache.clear(namespace)


# ----------------------------------------------------------------------------- errors
def error_response(status: int, message: str, kind: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status, headers=headers)


_KIND = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
         413: "request_too_large", 422: "invalid_request", 502: "upstream_error",
         503: "unavailable", 504: "upstream_timeout"}


def _fail(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


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

    The body is read here (at most ``max_request_bytes``) and replayed to the app, so chunked bodies
    are limited too. Keys are compared as SHA-256 digests in constant time and never logged.
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
        if self.settings.api_key_sha256 and path not in OPEN_PATHS and not self._authorized(headers):
            await error_response(401, "missing or invalid API key (send 'Authorization: Bearer KEY' "
                                      "or 'x-api-key: KEY')", "unauthorized",
                                 {"www-authenticate": "Bearer"})(scope, receive, send)
            return
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

    def _authorized(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        if not key:
            return False
        return hmac.compare_digest(key_digest(key), self.settings.api_key_sha256)

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

    @app.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz() -> dict:
        """Liveness (no API key needed)."""
        return {"status": "ok"}

    @app.post("/v1/cache/lookup", response_model=Union[LookupResponse, BatchLookupResponse],
              tags=["cache"])
    async def lookup(req: LookupRequest) -> dict:
        """Look up ``prompt`` (-> one result) or ``prompts`` (-> ``{results: [...]}``)."""
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
        results = await backend.lookup(prompts, req.namespace, histories)
        return results[0] if req.prompt is not None else {"results": results}

    @app.post("/v1/cache/store", response_model=StoreResponse, tags=["cache"])
    async def store(req: StoreRequest) -> dict:
        """Cache ``response`` for ``prompt`` in ``namespace`` (+ ``history``), optional ``ttl_s``."""
        check_prompt(req.prompt)
        check_text(req.response, "response")
        entry_id = await backend.store(req.prompt, req.response, req.namespace, req.history, req.ttl_s)
        return {"entry_id": entry_id}

    @app.get("/v1/cache/stats", tags=["cache"])
    async def stats() -> dict:
        """Entries, lookups, hits, misses, evictions, expirations, lookup latency percentiles (ms)."""
        return await backend.stats()

    @app.delete("/v1/cache", response_model=ClearResponse, tags=["cache"])
    async def clear(namespace: Optional[str] = Query(None, min_length=1,
                                                      max_length=MAX_NAMESPACE_CHARS)) -> dict:
        """Remove every entry, or only those of ``namespace``."""
        return {"removed": await backend.clear(namespace), "namespace": namespace}

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(req: ChatCompletionRequest,
                               x_raycache_namespace: Optional[str] = Header(None)):
        """OpenAI-compatible proxy: a cache hit answers at once (header ``x-raycache: hit`` and a
        ``raycache`` field); a miss is forwarded upstream, stored and returned (``x-raycache: miss``).
        Streaming requests, ``n`` > 1 and requests not ending in a text user message pass through
        uncached (``x-raycache: bypass``). Upstream error: 502; timeout: 504."""
        namespace = x_raycache_namespace or req.namespace or "default"
        if not 0 < len(namespace) <= MAX_NAMESPACE_CHARS:
            raise _fail(422, f"namespace must have 1..{MAX_NAMESPACE_CHARS} characters")
        body = req.model_dump(exclude={"namespace"}, exclude_unset=True)
        if not is_strict_json(body):
            raise _fail(422, "the request holds NaN/Infinity or invalid unicode (lone surrogates) and "
                             "cannot be forwarded")
        context = {k: body[k] for k in CHAT_CONTEXT_FIELDS if k in body}
        key = chat_key(body["messages"], req.model, context)
        if key is not None:
            check_prompt(key.prompt, "the last user message")
        if req.stream or req.n > 1 or key is None:
            return await _pass_through(body, req.stream)

        try:
            found = (await backend.lookup([key.prompt], namespace, [key.history]))[0]
        except Exception as exc:  # a proxy keeps answering when the cache fails
            logger.error("cache lookup failed (%s); forwarding upstream", type(exc).__name__)
            found = {"hit": False, "similarity": None}
        if found["hit"]:
            return JSONResponse(_cached_completion(req.model, found), headers={HIT_HEADER: "hit"})
        completion = await _forward(body)
        choice = (completion.get("choices") or [{}])[0]
        content = (choice.get("message") or {}).get("content") if isinstance(choice, dict) else None
        entry_id = None
        if isinstance(content, str) and choice.get("finish_reason") in (None, "stop"):
            try:
                entry_id = await backend.store(key.prompt, content, namespace, key.history)
            except Exception as exc:
                logger.error("caching the completion failed (%s)", type(exc).__name__)
        completion["raycache"] = {"hit": False, "stored": entry_id is not None, "entry_id": entry_id,
                                  "similarity": found["similarity"]}
        return JSONResponse(completion, headers={HIT_HEADER: "miss"})

    async def _forward(body: dict) -> dict:
        try:
            return await _need_upstream().chat_completion(body)
        except UpstreamTimeout as exc:
            raise _fail(504, str(exc)) from None
        except UpstreamError as exc:
            raise _fail(502, str(exc)) from None

    async def _pass_through(body: dict, stream: bool):
        if not stream:
            return JSONResponse(await _forward(body), headers={HIT_HEADER: "bypass"})
        try:
            response = await _need_upstream().open_stream(body)
        except UpstreamTimeout as exc:
            raise _fail(504, str(exc)) from None
        except UpstreamError as exc:
            raise _fail(502, str(exc)) from None
        return StreamingResponse(response.aiter_bytes(), status_code=response.status_code,
                                 media_type=response.headers.get("content-type", "text/event-stream"),
                                 headers={HIT_HEADER: "bypass"}, background=BackgroundTask(response.aclose))

    return app


def _cached_completion(model: str, found: dict) -> dict:
    """An OpenAI chat.completion object answering from the cache (token usage 0: no LLM call)."""
    return {
        "id": f"chatcmpl-raycache-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": found["response"]},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "raycache": {"hit": True, "similarity": found["similarity"], "exact": found["exact"],
                     "matched_prompt": found["matched_prompt"], "entry_id": found["entry_id"]},
    }
