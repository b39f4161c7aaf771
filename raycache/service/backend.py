"""The cache behind the routes: the :class:`CacheBackend` interface (the CacheEngine deployment's
handle, or a shard router, implements it) and :class:`EngineBackend`, a SemanticCache in process
with memoised, batched embedding and per-call timings."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Awaitable, Callable, Optional, Protocol, Union

import numpy as np

from raycache.cache.engine import LATENCY_WINDOW, _percentiles
from raycache.service.coalesce import VECTOR_MEMO_SIZE, VectorMemo

__all__ = ["CacheBackend", "Embedded", "EngineBackend"]


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
