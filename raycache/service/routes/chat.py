"""The OpenAI-compatible proxy, ``POST /v1/chat/completions``: a cacheable request (see
:class:`raycache.service.chat_scope.ChatKeyPolicy`) is answered from the cache on a hit (as JSON or
replayed SSE), else forwarded upstream and its answer stored (streamed through when ``stream: true``,
identical concurrent misses coalesced); any other request passes through uncached. Upstream error:
502; timeout: 504."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import httpx
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from raycache.cache.scope import MAX_NAMESPACE_CHARS, history_hash
from raycache.service.backend import CacheBackend
from raycache.service.chat_scope import ChatKey, ChatKeyPolicy
from raycache.service.coalesce import SingleFlight
from raycache.service.completions import (StreamAssembler, answer_contents, cached_completion, cached_contents,
                                          replay_events)
from raycache.service.models import ChatCompletionRequest
from raycache.service.routes.common import authorize, check_prompt, fail
from raycache.service.settings import ApiSettings
from raycache.service.upstream import UpstreamClient, UpstreamError, UpstreamTimeout, is_strict_json

logger = logging.getLogger(__name__)

__all__ = ["BYPASS_HEADER", "HIT_HEADER", "LazyUpstream", "NAMESPACE_HEADER", "add_chat_routes"]

HIT_HEADER = "x-raycache"
BYPASS_HEADER = "x-raycache-bypass-reason"
NAMESPACE_HEADER = "x-raycache-namespace"


class LazyUpstream:
    """The proxy's upstream client: the injected ``client`` (the caller's to close), or one of
    ``settings.upstream`` (key from env var ``settings.upstream_api_key_env``) made on first use and
    closed by :meth:`aclose`."""

    def __init__(self, settings: ApiSettings, client: Optional[UpstreamClient] = None):
        self.settings = settings
        self.client = client
        self.owned = client is None

    def get(self) -> UpstreamClient:
        """The client; 503 when no upstream is configured."""
        if self.client is None:
            if not self.settings.upstream:
                raise fail(503, "cache miss and no upstream configured (start the service with "
                                "--upstream URL)")
            self.client = UpstreamClient(self.settings.upstream,
                                         os.environ.get(self.settings.upstream_api_key_env),
                                         self.settings.upstream_timeout_s)
        return self.client

    async def aclose(self) -> None:
        """Close the client this made (an injected one is left open)."""
        if self.owned and self.client is not None:
            await self.client.aclose()
            self.client = None


def upstream_failure(exc: UpstreamError) -> HTTPException:
    """504 for a timeout, else 502 (with the upstream's Retry-After when it sent one)."""
    if isinstance(exc, UpstreamTimeout):
        return fail(504, str(exc))
    return fail(502, str(exc), {"retry-after": exc.retry_after} if exc.retry_after else None)


def add_chat_routes(app: FastAPI, backend: CacheBackend, settings: ApiSettings, upstream: LazyUpstream,
                    policy: ChatKeyPolicy) -> None:
    """Add the proxy route to ``app``: over ``backend``, misses forwarded to ``upstream``, caching
    what ``policy`` keys; identical misses in flight in this process share one upstream call."""
    flights = SingleFlight()  # identical chat misses in flight in this process

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
            raise fail(422, f"namespace must have 1..{MAX_NAMESPACE_CHARS} characters")
        authorize(request, namespace)
        body = req.model_dump(exclude={"namespace"}, exclude_unset=True)
        if not is_strict_json(body):
            raise fail(422, "the request holds NaN/Infinity or invalid unicode (lone surrogates) and "
                            "cannot be forwarded")
        key, bypass = policy.key(body)
        if key is not None:
            check_prompt(key.prompt, settings.max_prompt_chars, "the last user message")
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
            contents = answer_contents(completion.get("choices"), req.n)
            entry_id = None
            if contents is not None:
                entry_id = await _store_answer(key, namespace, contents)
        completion["raycache"] = {**info, "stored": entry_id is not None, "entry_id": entry_id}
        return JSONResponse(completion, headers={HIT_HEADER: "miss"})

    async def _answer_from_cache(key: ChatKey, namespace: str, req: ChatCompletionRequest,
                                 body: dict) -> tuple[dict, Optional[Any]]:
        """(the lookup's result, the cached answer as a response or None on a miss)."""
        try:
            found = (await backend.lookup([key.prompt], namespace, [key.history]))[0]
        except Exception as exc:  # a proxy keeps answering when the cache fails
            logger.error("cache lookup failed (%s); forwarding upstream", type(exc).__name__)
            return {"hit": False, "similarity": None}, None
        if found["hit"]:
            contents = cached_contents(found["response"], req.n)
            if contents is not None:
                if req.stream:
                    return found, StreamingResponse(
                        replay_events(req.model, found, contents, body.get("stream_options")),
                        media_type="text/event-stream", headers={HIT_HEADER: "hit"})
                return found, JSONResponse(cached_completion(req.model, found, contents),
                                           headers={HIT_HEADER: "hit"})
        return found, None

    async def _store_answer(key: ChatKey, namespace: str, contents: list[str]) -> Optional[int]:
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
            return await upstream.get().chat_completion(body)
        except UpstreamError as exc:
            raise upstream_failure(exc) from None

    async def _open_stream(body: dict):
        try:
            return await upstream.get().open_stream(body)
        except UpstreamError as exc:
            raise upstream_failure(exc) from None

    async def _pass_through(body: dict, stream: bool, reason: Optional[str]):
        headers = {HIT_HEADER: "bypass",
                   BYPASS_HEADER: (reason or "")[:300].encode("ascii", "backslashreplace").decode()}
        if not stream:
            return JSONResponse(await _forward(body), headers=headers)
        response = await _open_stream(body)
        return StreamingResponse(response.aiter_bytes(), status_code=response.status_code,
                                 media_type=response.headers.get("content-type", "text/event-stream"),
                                 headers=headers, background=BackgroundTask(response.aclose))

    async def _stream_and_store(body: dict, key: ChatKey, namespace: str, info: dict, n: int):
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
