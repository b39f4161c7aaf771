"""Namespace sharding of the cache service: which shard holds a namespace, and one backend over N.

``raycache serve --shards N`` runs N CacheEngine replicas (deployments ``CacheEngine-0`` …
``CacheEngine-{N-1}``); a namespace lives on exactly one of them (:func:`shard_of`, a stable hash,
the same in every process and after every restart), so a lookup or store touches one shard and
scopes never span shards. :class:`ShardedBackend` is the routes' backend over the N shard backends:
lookups and stores go to the namespace's shard, ``stats`` and ``clear()`` fan out to all of them
(:func:`merge_stats`: counters summed, so ``entries`` counts every shard), ``clear(namespace)``
goes to the namespace's shard. Each shard persists to its own path (:func:`shard_persist_path`) and
restores it after a restart. Imports nothing from Ray.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Optional, Sequence

__all__ = ["ShardedBackend", "engine_deployment_name", "merge_stats", "shard_of", "shard_persist_path"]

# stats fields that describe the configuration (the same on every shard), not counts
_SAME_ON_EVERY_SHARD = {"capacity_per_shard", "default_ttl_s", "embed_window_tokens", "exact_match",
                        "exact_tier", "index", "policy"}


def shard_of(namespace: str, shards: int) -> int:
    """The shard (0 … ``shards`` − 1) that holds ``namespace``: BLAKE2b of its UTF-8 text modulo
    ``shards`` (not Python's per-process salted ``hash``), so every ingress replica and every restart
    routes a namespace to the same shard."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards == 1:
        return 0
    digest = hashlib.blake2b(namespace.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def engine_deployment_name(shard: int, shards: int) -> str:
    """The Serve deployment of shard ``shard``: ``CacheEngine`` when unsharded (as before),
    ``CacheEngine-<shard>`` otherwise."""
    return "CacheEngine" if shards == 1 else f"CacheEngine-{shard}"


def shard_persist_path(path: Optional[str], shard: int, shards: int) -> Optional[str]:
    """Where shard ``shard`` of ``shards`` persists: ``path`` itself when unsharded, else
    ``<path>.shard-<i>-of-<n>`` (local path or URI alike). The shard count is in the name because a
    namespace's shard depends on it: a restart with another ``--shards`` starts those shards empty
    rather than serve namespaces from the wrong shard's files."""
    if path is None or shards == 1:
        return path
    return f"{path.rstrip('/')}.shard-{shard}-of-{shards}"


def _worst(parts: Sequence[Any]) -> Any:
    """Per-key maximum of percentile dicts (nested dicts recursively); None where no shard has one."""
    dicts = [p for p in parts if isinstance(p, dict)]
    if not dicts:
        numbers = [p for p in parts if isinstance(p, (int, float)) and not isinstance(p, bool)]
        return max(numbers) if numbers else None
    return {key: _worst([d.get(key) for d in dicts]) for key in dicts[0]}


def _merge_persistence(parts: Sequence[dict]) -> dict:
    saved = [p.get("last_saved_at") for p in parts]
    errors = [p.get("load_error") for p in parts if p.get("load_error")]
    merged = {"enabled": all(p.get("enabled") for p in parts),
              "loaded_entries": sum(p.get("loaded_entries") or 0 for p in parts),
              "load_error": "; ".join(errors) if errors else None,
              # everything stored before the oldest shard's last save is on disk
              "last_saved_at": None if any(s is None for s in saved) else min(saved)}
    for key in parts[0]:
        if key not in merged:
            merged[key] = [p.get(key) for p in parts]
    return merged


def merge_stats(parts: Sequence[dict]) -> dict:
    """One ``/v1/cache/stats`` document from the shards' (in shard order): counts summed
    (``entries``, ``lookups``, ``hits``, ``capacity``, …), ``hit_rate`` recomputed, latency
    percentile dicts (``*_ms``) the worst shard's per percentile, configuration fields (policy, index,
    window) from shard 0, ``persistence`` merged (``last_saved_at`` the oldest shard's), and
    ``shards``: each shard's entries, lookups, hits and persistence."""
    if not parts:
        raise ValueError("merge_stats needs at least one shard's stats")
    merged: dict[str, Any] = {}
    for key, first in parts[0].items():
        values = [p.get(key) for p in parts]
        if key in _SAME_ON_EVERY_SHARD or key == "shards":
            merged[key] = first
        elif key == "persistence" and all(isinstance(v, dict) for v in values):
            merged[key] = _merge_persistence(values)
        elif key.endswith("_ms") or key.endswith("_ms_by_call"):
            merged[key] = _worst(values)
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            merged[key] = sum(numbers)
        else:
            merged[key] = first
    lookups, hits = merged.get("lookups"), merged.get("hits")
    if "hit_rate" in merged:
        merged["hit_rate"] = hits / lookups if lookups else None
    merged["shards"] = [{"shard": i, "entries": p.get("entries"), "lookups": p.get("lookups"),
                         "hits": p.get("hits"), "persistence": p.get("persistence")}
                        for i, p in enumerate(parts)]
    return merged


class ShardedBackend:
    """The routes' cache backend (``raycache.service.api.CacheBackend``) over one backend per shard:
    a namespace's requests go to ``backends[shard_of(namespace, N)]``; ``stats`` and ``clear()``
    fan out to every shard concurrently."""

    def __init__(self, backends: Sequence[Any]):
        if not backends:
            raise ValueError("ShardedBackend needs at least one shard backend")
        self.backends = list(backends)

    def shard(self, namespace: str) -> Any:
        """The backend of ``namespace``'s shard."""
        return self.backends[shard_of(namespace, len(self.backends))]

    async def lookup(self, prompts, namespace="default", histories=None) -> list[dict]:
        return await self.shard(namespace).lookup(prompts, namespace, histories)

    async def store(self, prompt, response, namespace="default", history=None, ttl_s=None) -> int:
        return await self.shard(namespace).store(prompt, response, namespace, history, ttl_s)

    async def store_batch(self, prompts, responses, namespace="default", history=None,
                          ttl_s=None) -> list[int]:
        return await self.shard(namespace).store_batch(prompts, responses, namespace, history, ttl_s)

    async def stats(self) -> dict:
        return merge_stats(await asyncio.gather(*(b.stats() for b in self.backends)))

    async def clear(self, namespace: Optional[str] = None) -> int:
        if namespace is not None:
            return await self.shard(namespace).clear(namespace)
        return sum(await asyncio.gather(*(b.clear(None) for b in self.backends)))
