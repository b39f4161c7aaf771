"""The cache's own routes: ``GET /healthz``, ``POST /v1/cache/lookup``, ``POST /v1/cache/store``,
``GET /v1/cache/stats`` and ``DELETE /v1/cache``, each checking its input and the key's namespaces
before it calls the backend."""

from __future__ import annotations

from typing import Optional, Union

from fastapi import FastAPI, Query, Request

from raycache.cache.scope import MAX_NAMESPACE_CHARS
from raycache.service.backend import CacheBackend
from raycache.service.models import (BatchLookupResponse, BatchStoreResponse, ClearResponse, HealthResponse,
                                     LookupRequest, LookupResponse, StoreRequest, StoreResponse)
from raycache.service.routes.common import authorize, check_history, check_prompt, check_text, fail, from_backend
from raycache.service.settings import ApiSettings

__all__ = ["add_cache_routes"]


def add_cache_routes(app: FastAPI, backend: CacheBackend, settings: ApiSettings, chat_key_info: dict) -> None:
    """Add the routes over ``backend``, under ``settings``' limits, to ``app``; ``chat_key_info``:
    the chat keying that ``/v1/cache/stats`` reports (``chat_key``)."""

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
            raise fail(422, "send exactly one of 'prompt' or 'prompts'")
        prompts = [req.prompt] if req.prompt is not None else req.prompts
        if not prompts:
            raise fail(422, "prompts must not be empty")
        if len(prompts) > settings.max_batch_prompts:
            raise fail(422, f"{len(prompts)} prompts in one batch; the limit is {settings.max_batch_prompts}")
        for i, p in enumerate(prompts):
            check_prompt(p, settings.max_prompt_chars, "prompt" if req.prompt is not None else f"prompts[{i}]")
        histories = None if req.history is None else [req.history] * len(prompts)
        check_history(req.history)
        results = await from_backend(backend.lookup(prompts, req.namespace, histories), "lookup")
        return results[0] if req.prompt is not None else {"results": results}

    @app.post("/v1/cache/store", response_model=Union[StoreResponse, BatchStoreResponse], tags=["cache"])
    async def store(req: StoreRequest, request: Request) -> dict:
        """Cache ``response`` for ``prompt`` (-> ``{entry_id}``), or ``responses[i]`` for each of
        ``prompts`` (-> ``{entry_ids: [...]}``, all stored or none), in ``namespace`` (+
        ``history``), optional ``ttl_s``."""
        authorize(request, req.namespace)
        single = req.prompt is not None or req.response is not None
        if single == (req.prompts is not None or req.responses is not None):
            raise fail(422, "send exactly one of 'prompt' + 'response' or 'prompts' + 'responses'")
        if single:
            if req.prompt is None or req.response is None:
                raise fail(422, f"'{'response' if req.response is None else 'prompt'}' is missing "
                                f"(a store needs both 'prompt' and 'response')")
            check_prompt(req.prompt, settings.max_prompt_chars)
            check_text(req.response, "response")
            check_history(req.history)
            entry_id = await from_backend(
                backend.store(req.prompt, req.response, req.namespace, req.history, req.ttl_s), "store")
            return {"entry_id": entry_id}
        if req.prompts is None or req.responses is None:
            raise fail(422, f"'{'responses' if req.responses is None else 'prompts'}' is missing "
                            f"(a batch store needs both 'prompts' and 'responses')")
        if not req.prompts:
            raise fail(422, "prompts must not be empty")
        if len(req.prompts) > settings.max_batch_prompts:
            raise fail(422, f"{len(req.prompts)} prompts in one batch; the limit is {settings.max_batch_prompts}")
        if len(req.responses) != len(req.prompts):
            raise fail(422, f"{len(req.responses)} responses for {len(req.prompts)} prompts "
                            f"(one response per prompt)")
        for i, (p, r) in enumerate(zip(req.prompts, req.responses)):
            check_prompt(p, settings.max_prompt_chars, f"prompts[{i}]")
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
        return {"entry_ids": await from_backend(call, "store")}

    @app.get("/v1/cache/stats", tags=["cache"])
    async def stats(request: Request) -> dict:
        """Entries, lookups, hits, misses, evictions, expirations, lookup latency percentiles (ms),
        and which chat request fields are keyed (``chat_key``). Admin keys only."""
        authorize(request, None)
        return {**await from_backend(backend.stats(), "stats"), "chat_key": chat_key_info}

    @app.delete("/v1/cache", response_model=ClearResponse, tags=["cache"])
    async def clear(request: Request, namespace: Optional[str] = Query(
            None, min_length=1, max_length=MAX_NAMESPACE_CHARS)) -> dict:
        """Remove every entry (admin keys only), or only those of ``namespace``."""
        authorize(request, namespace)
        return {"removed": await from_backend(backend.clear(namespace), "clear"), "namespace": namespace}
