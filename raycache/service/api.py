"""The HTTP API (FastAPI): :func:`create_app` puts the app together over a cache backend.

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

The parts, one job each: :mod:`~raycache.service.settings` (settings, API keys),
:mod:`~raycache.service.models` (request/response bodies), :mod:`~raycache.service.backend` (the
cache behind the routes), :mod:`~raycache.service.routes` (``common``: guard, checks, errors;
``cache``; ``chat``), :mod:`~raycache.service.chat_scope` (a chat request's cache key) and
:mod:`~raycache.service.completions` (the chat completion wire format). Their public names are
re-exported here.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI

from raycache.service.backend import CacheBackend, Embedded, EngineBackend
from raycache.service.chat_scope import CHAT_TRANSPORT_FIELDS, TOOL_FIELDS, ChatKeyPolicy
from raycache.service.completions import REPLAY_WORDS_PER_CHUNK, StreamAssembler, replay_pieces, sse_event
from raycache.service.models import (MAX_HISTORY_TURNS, MAX_TTL_S, BatchLookupResponse, BatchStoreResponse,
                                     ChatCompletionRequest, ChatMessage, ClearResponse, HealthResponse,
                                     LookupRequest, LookupResponse, StoreRequest, StoreResponse, Turn)
from raycache.service.routes.cache import add_cache_routes
from raycache.service.routes.chat import BYPASS_HEADER, HIT_HEADER, NAMESPACE_HEADER, LazyUpstream, add_chat_routes
from raycache.service.routes.common import (OPEN_PATHS, PRINCIPAL, RETRY_AFTER_S, RequestGuard, error_response,
                                            install_error_handlers)
from raycache.service.settings import ADMIN, ApiSettings, KeyGrant, key_digest, read_api_keys
from raycache.service.upstream import UpstreamClient

__all__ = [
    "ADMIN", "ApiSettings", "BYPASS_HEADER", "BatchLookupResponse", "BatchStoreResponse", "CHAT_TRANSPORT_FIELDS",
    "CacheBackend", "ChatCompletionRequest", "ChatMessage", "ClearResponse", "Embedded", "EngineBackend",
    "HIT_HEADER", "HealthResponse", "KeyGrant", "LookupRequest", "LookupResponse", "MAX_HISTORY_TURNS",
    "MAX_TTL_S", "NAMESPACE_HEADER", "OPEN_PATHS", "PRINCIPAL", "REPLAY_WORDS_PER_CHUNK", "RETRY_AFTER_S",
    "RequestGuard", "StoreRequest", "StoreResponse", "StreamAssembler", "TOOL_FIELDS", "Turn", "create_app",
    "error_response", "key_digest", "read_api_keys", "replay_pieces", "sse_event",
]


def create_app(backend: CacheBackend, settings: ApiSettings,
               upstream: Optional[UpstreamClient] = None) -> FastAPI:
    """The FastAPI app over ``backend``. ``upstream`` serves chat-completion misses; None = a client
    of ``settings.upstream`` (key from env var ``settings.upstream_api_key_env``), made on first
    use and closed at app shutdown. An injected client is the caller's to close."""
    client = LazyUpstream(settings, upstream)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await client.aclose()

    app = FastAPI(title="raycache", version="0.1.0", lifespan=lifespan,
                  description="Semantic prompt cache: look prompts up, store responses, or use the "
                              "OpenAI-compatible proxy. Send 'Authorization: Bearer KEY' when the "
                              "service has an API key.")
    app.add_middleware(RequestGuard, settings=settings)
    install_error_handlers(app)
    policy = ChatKeyPolicy(settings.chat_key_fields, settings.chat_unkeyed_fields,
                           settings.chat_cache_tools, settings.chat_cache_n)
    add_cache_routes(app, backend, settings, policy.info())
    add_chat_routes(app, backend, settings, client, policy)
    return app
