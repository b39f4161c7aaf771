"""The Ray Serve application: ``Embedder`` -> ``CacheEngine`` <- ``Ingress`` (FastAPI).

* ``Embedder``: the sentence encoder, requests batched across callers with ``@serve.batch``;
  autoscaling replicas (CPU, or GPU when ``embedder_num_gpus`` > 0). With each vector it returns the
  key of the prompt's text beyond the model's window, which scopes long prompts (an exact match).
  With ``embedder: engine`` there is no Embedder deployment: each CacheEngine replica holds the
  same :class:`BatchedEncoder` (CPU deployments: one hop fewer per request).
* ``CacheEngine``: one stateful replica owning the SemanticCache; loads the snapshot on start,
  appends what changed to its segment log every ``persist_interval_s`` and on shutdown; exports Ray metrics
  (Prometheus through Ray's metrics agent, tagged with the shard), gauges updated on every request.
  With ``shards`` N > 1 there are N of them (``CacheEngine-0`` … ``CacheEngine-{N-1}``, one replica
  each, each persisting to its own path); a namespace lives on one (:mod:`raycache.service.shards`).
* ``Ingress``: the FastAPI app of :mod:`raycache.service.api` over the shard(s). With
  ``embedder: ingress`` it is the only deployment: one replica builds a CacheEngine (the same class,
  encoder included) in its own process (:func:`local_engine`), two hops fewer per request.

``build_app(cfg)`` returns the bound application; ``app_builder(args)`` is the ``import_path`` target
of the ``serve deploy`` YAML (:mod:`raycache.service.serve_config`); ``run(cfg)`` is
``raycache serve``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any, Optional

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from raycache.cache.engine import PrecomputedEncoder, SemanticCache, load_calibration_pairs, policy_from_config
from raycache.cache.persist import SnapshotError, quarantine
from raycache.cache.segments import PeriodicFlush
from raycache.config import CacheConfig, ConfigError, EncoderConfig, ServeConfig
from raycache.cache.scope import tail_key
from raycache.io import free_port
from raycache.service.api import ApiSettings, EngineBackend, create_app, key_digest, read_api_keys
from raycache.service.serve_config import APP_NAME, deployment_options, engine_embedder_threads
from raycache.service.shards import ShardedBackend, engine_deployment_name, shard_persist_path

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


def model_tag(encoder_cfg: EncoderConfig) -> str:
    """Which encoder made a snapshot's vectors: the model folder / id, or 'default'; '+int8' when
    quantised (its vectors differ from the fp32 model's)."""
    tag = encoder_cfg.model or "default"
    return tag if encoder_cfg.precision == "fp32" else f"{tag}+{encoder_cfg.precision}"


class BatchedEncoder:
    """Texts -> L2-normalised float32 vectors from the sentence encoder of ``encoder_cfg``;
    concurrent calls in one process share forward passes (``@serve.batch``). The Embedder
    deployment is one; with ``ServeConfig.embedder: engine`` each CacheEngine replica holds its own.
    ``threads``: torch intra-op threads (None = as the process was started)."""

    def __init__(self, encoder_cfg: dict, max_batch_size: int, batch_wait_s: float,
                 threads: Optional[int] = None):
        from raycache.encoder import Encoder

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        cfg = EncoderConfig(**encoder_cfg)
        self.encoder = Encoder.from_config(cfg)
        self.batch_size = cfg.batch_size
        self._embed_batch.set_max_batch_size(max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batch_wait_s)

    async def dim(self) -> int:
        return self.encoder.dim

    async def window(self) -> int:
        """Tokens embedded per prompt (longer prompts are scoped by their tail)."""
        return self.encoder.max_length

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, texts: list[str]) -> list[np.ndarray]:
        vectors = await asyncio.to_thread(self.encoder.encode, texts, self.batch_size)
        return list(vectors)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim]; each text joins whatever batch is forming."""
        rows = await asyncio.gather(*(self._embed_batch(t) for t in texts))
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.encoder.dim), np.float32)

    async def embed_with_tails(self, texts: list[str]) -> tuple[np.ndarray, list[str]]:
        """(``embed(texts)``, the key of each text's part beyond the window; "" if it all fits)."""
        vectors = await self.embed(texts)
        return vectors, [tail_key(t) for t in self.encoder.unembedded_tails(texts)]


@serve.deployment(name="Embedder", max_ongoing_requests=32)
class Embedder(BatchedEncoder):
    """The embedder deployment: stateless :class:`BatchedEncoder` replicas (CPU, or GPU when
    ``embedder_num_gpus`` > 0), autoscaled, shared by every CacheEngine shard."""


class _EmbedderHandle:
    """:class:`BatchedEncoder`'s async interface over an Embedder DeploymentHandle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def dim(self) -> int:
        return await self.handle.dim.remote()

    async def window(self) -> Optional[int]:
        return await self.handle.window.remote() if hasattr(self.handle, "window") else None

    async def embed_with_tails(self, texts: list[str]) -> tuple[np.ndarray, list[str]]:
        return await self.handle.embed_with_tails.remote(texts)


class _EngineMetrics:
    """Ray metrics of the cache (exported to Prometheus by Ray's metrics agent)."""

    def __init__(self, shard: int = 0) -> None:
        from ray.util import metrics

        self.lookups = metrics.Counter("raycache_lookups", "Prompts looked up, by result.",
                                       tag_keys=("result", "shard"))
        self.latency = metrics.Histogram("raycache_lookup_latency_ms",
                                         "Lookup call latency incl. embedding (ms).",
                                         boundaries=LATENCY_BUCKETS_MS, tag_keys=("shard",))
        self.stores = metrics.Counter("raycache_stores", "Responses stored.", tag_keys=("shard",))
        self.removed = metrics.Counter("raycache_removed_entries", "Entries evicted or expired.",
                                       tag_keys=("reason", "shard"))
        self.entries = metrics.Gauge("raycache_entries", "Entries in the cache (of this shard).",
                                     tag_keys=("shard",))
        for metric in (self.lookups, self.latency, self.stores, self.removed, self.entries):
            metric.set_default_tags({"shard": str(shard)})
        self._seen = {"evictions": 0, "expirations": 0}

    def record_lookups(self, results: list[dict], latency_ms: float) -> None:
        exact = sum(r["exact"] for r in results)
        hits = sum(r["hit"] for r in results)
        for result, count in (("exact_hit", exact), ("semantic_hit", hits - exact),
                              ("miss", len(results) - hits)):
            if count:
                self.lookups.inc(count, tags={"result": result})
        self.latency.observe(latency_ms)

    def record_state(self, stats: dict) -> None:
        """Entries gauge and the eviction/expiration counters from ``stats`` (or the cheaper
        ``SemanticCache.gauges``); called on every request."""
        self.entries.set(stats["entries"])
        for counter, reason in (("evictions", "evicted"), ("expirations", "expired")):
            delta = stats[counter] - self._seen[counter]
            if delta > 0:
                self.removed.inc(delta, tags={"reason": reason})
            self._seen[counter] = stats[counter]


@serve.deployment(name="CacheEngine", num_replicas=1, max_ongoing_requests=1024)
class CacheEngine:
    """A stateful replica: a SemanticCache fed vectors by the Embedder deployment (``embedder``
    a DeploymentHandle), or by an encoder of its own (``embedder`` the keyword arguments of a
    :class:`BatchedEncoder`: one hop fewer per request). Shard ``shard`` of ``shards``: it holds
    the namespaces that hash to it and persists to its own path."""

    async def __init__(self, embedder: DeploymentHandle | dict, cache_cfg: dict, tag: str, shard: int = 0,
                       shards: int = 1):
        cfg = CacheConfig(**cache_cfg)
        if isinstance(embedder, dict):
            self.embedder = await asyncio.to_thread(BatchedEncoder, **embedder)
        else:
            self.embedder = _EmbedderHandle(embedder)
        dim = await self.embedder.dim()
        self.window = await self.embedder.window()
        self.tag = tag
        self.shard = shard
        policy = await self._policy(cfg)
        self.cache = SemanticCache.from_config(cfg, encoder=None, dim=dim, policy=policy, model_tag=tag)
        self.backend = EngineBackend(self.cache, embed=self._embed)
        self.metrics = _EngineMetrics(shard)
        self.snapshot_status = {"loaded_entries": 0, "load_error": None, "quarantined_to": None}
        self.saver: Optional[PeriodicFlush] = None
        persist_path = shard_persist_path(cfg.persist_path, shard, shards)
        if persist_path:  # an incremental segment log (raycache.cache.segments); reads old snapshots
            self.saver = PeriodicFlush(persist_path, self.cache, cfg.persist_interval_s)
            await asyncio.to_thread(self._load, persist_path)
            self.saver.start()

    async def _embed(self, texts: list[str]) -> tuple[np.ndarray, list[str]]:
        return await self.embedder.embed_with_tails(texts)

    async def _policy(self, cfg: CacheConfig):
        """The decision policy of ``cfg`` (:func:`policy_from_config`, the one place it is built);
        the calibration pairs of a pair-calibrated policy are embedded by the Embedder first."""
        texts: list[str] = []
        if cfg.policy == "calibrated" and not cfg.policy_file and cfg.calibration_pairs:
            prompts_a, prompts_b, _ = await asyncio.to_thread(load_calibration_pairs, cfg.calibration_pairs)
            texts = list(dict.fromkeys(prompts_a + prompts_b))
        vectors = (await self._embed(texts))[0] if texts else None
        return policy_from_config(cfg, PrecomputedEncoder(texts, vectors, source=self.tag))

    def _load(self, path: str) -> None:
        try:
            self.snapshot_status["loaded_entries"] = self.saver.restore()
            logger.info("cache loaded: %d entries from %s", self.snapshot_status["loaded_entries"], path)
        except FileNotFoundError:
            logger.info("no cache snapshot at %s yet; starting empty", path)
        except SnapshotError as exc:
            aside = quarantine(path)
            self.snapshot_status.update(load_error=str(exc), quarantined_to=str(aside))
            logger.error("%s -- moved aside to %s; starting with an empty cache", exc, aside)

    async def lookup(self, prompts: list[str], namespace: str = "default",
                     histories: Optional[list] = None) -> list[dict]:
        started = time.perf_counter()
        results = await self.backend.lookup(prompts, namespace, histories)
        self.metrics.record_lookups(results, (time.perf_counter() - started) * 1000.0)
        await self._record_state()
        return results

    async def store(self, prompt: str, response: str, namespace: str = "default",
                    history: Optional[list] = None, ttl_s: Optional[float] = None) -> int:
        return (await self.store_batch([prompt], [response], namespace, history, ttl_s))[0]

    async def store_batch(self, prompts: list[str], responses: list[str], namespace: str = "default",
                          history: Optional[list] = None, ttl_s: Optional[float] = None) -> list[int]:
        entry_ids = await self.backend.store_batch(prompts, responses, namespace, history, ttl_s)
        self.metrics.stores.inc(len(entry_ids))
        await self._record_state()
        return entry_ids

    async def _record_state(self) -> None:
        """Gauges after a request (the cache call runs in a worker thread, off the event loop)."""
        self.metrics.record_state(await asyncio.to_thread(self.cache.gauges))

    async def stats(self) -> dict:
        stats = await self.backend.stats()
        self.metrics.record_state(stats)
        persist = {"enabled": self.saver is not None, **self.snapshot_status,
                   **(self.saver.status() if self.saver else {})}
        return {**stats, "embed_window_tokens": self.window, "persistence": persist}

    async def clear(self, namespace: Optional[str] = None) -> int:
        removed = await self.backend.clear(namespace)
        await self._record_state()
        return removed

    def save(self) -> bool:
        """Write a snapshot now (if persistence is on); returns whether one was written."""
        return self.saver.save() if self.saver else False

    def __del__(self) -> None:
        saver = getattr(self, "saver", None)
        if saver is not None:
            saver.stop(final_save=True)


class _RemoteBackend:
    """The CacheBackend interface over one CacheEngine deployment (shard) handle."""

    def __init__(self, engine: DeploymentHandle):
        self.engine = engine

    async def lookup(self, prompts, namespace="default", histories=None) -> list[dict]:
        return await self.engine.lookup.remote(prompts, namespace, histories)

    async def store(self, prompt, response, namespace="default", history=None, ttl_s=None) -> int:
        return await self.engine.store.remote(prompt, response, namespace, history, ttl_s)

    async def store_batch(self, prompts, responses, namespace="default", history=None,
                          ttl_s=None) -> list[int]:
        return await self.engine.store_batch.remote(prompts, responses, namespace, history, ttl_s)

    async def stats(self) -> dict:
        return await self.engine.stats.remote()

    async def clear(self, namespace=None) -> int:
        return await self.engine.clear.remote(namespace)


async def local_engine(**engine_args) -> Any:
    """A CacheEngine built in this process (not a deployment): the same class, its async
    ``__init__`` awaited here, so ``embedder: ingress`` runs the very code of a CacheEngine replica."""
    cls = CacheEngine.func_or_class
    engine = cls.__new__(cls)
    await cls.__init__(engine, **engine_args)
    return engine


@serve.deployment(name="Ingress", max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    """HTTP entry point: the FastAPI app, built on the replica over the CacheEngine handle(s)
    (one per shard, in shard order; a single handle = unsharded), or, with ``embedder: ingress``
    (``engines`` = ``{"local": CacheEngine arguments}``), over a CacheEngine in this replica."""

    async def __init__(self, engines: Any, settings: dict, online: Optional[dict] = None):
        self.local = None
        if isinstance(engines, dict):
            self.local = await local_engine(**engines["local"])
            self.engines = []
        else:
            self.engines = list(engines) if isinstance(engines, (list, tuple)) else [engines]
        self.settings = ApiSettings(**settings)
        self.online = online  # online verification (raycache.service.verify), None = off

    def __serve_build_asgi_app__(self):
        from raycache.service.verify import wrap_backend

        shards = ([self.local] if self.local is not None
                  else [_RemoteBackend(engine) for engine in self.engines])
        backend = shards[0] if len(shards) == 1 else ShardedBackend(shards)
        return create_app(wrap_backend(backend, self.online), self.settings)

    async def save(self) -> bool:
        """Write the in-replica cache's snapshot now (``embedder: ingress``, persistence on)."""
        return await asyncio.to_thread(self.local.save) if self.local is not None else False

    def __del__(self) -> None:  # the final flush at replica shutdown, not whenever GC runs
        if getattr(self, "local", None) is not None:
            self.local.__del__()


def api_settings(cfg: ServeConfig) -> ApiSettings:
    """HTTP settings for ``cfg``; the API key is read from env var ``cfg.api_key_env`` now and only
    its SHA-256 digest is passed on."""
    api_keys = {}
    if cfg.api_keys_file:
        try:
            api_keys = read_api_keys(cfg.api_keys_file)
        except ValueError as exc:
            raise ConfigError(f"--api-keys-file: {exc}") from None
    return ApiSettings(api_key_sha256=key_digest(os.environ.get(cfg.api_key_env)), api_keys=api_keys,
                       max_request_bytes=cfg.max_request_bytes, max_prompt_chars=cfg.max_prompt_chars,
                       max_batch_prompts=cfg.max_batch_prompts, upstream=cfg.upstream,
                       upstream_timeout_s=cfg.upstream_timeout_s,
                       upstream_api_key_env=cfg.upstream_api_key_env,
                       chat_key_fields=cfg.chat_key_fields, chat_unkeyed_fields=cfg.chat_unkeyed_fields,
                       chat_cache_tools=cfg.chat_cache_tools, chat_cache_n=cfg.chat_cache_n)


def build_app(cfg: ServeConfig):
    """The bound Serve application (Embedder -> CacheEngine shard(s) <- Ingress, or CacheEngine
    shard(s) embedding themselves <- Ingress with ``embedder: engine``) for ``cfg``."""
    options = deployment_options(cfg)
    encoder_args = {"encoder_cfg": cfg.encoder.model_dump(), "max_batch_size": cfg.serve_batch_size,
                    "batch_wait_s": cfg.serve_batch_wait_s}
    if cfg.embedder in ("engine", "ingress"):  # each engine replica embeds itself
        embedder = {**encoder_args, "threads": engine_embedder_threads(cfg)}
    else:
        embedder = Embedder.options(**options["Embedder"]).bind(**encoder_args)
    from raycache.service.verify import engine_cache_config, online_settings

    if cfg.embedder == "ingress":  # one process: the Ingress replica holds the one shard
        local = {"embedder": embedder, "cache_cfg": engine_cache_config(cfg),
                 "tag": model_tag(cfg.encoder)}
        return Ingress.options(**options["Ingress"]).bind(
            {"local": local}, api_settings(cfg).model_dump(), online_settings(cfg))
    engines = []
    for shard in range(cfg.shards):
        name = engine_deployment_name(shard, cfg.shards)
        engines.append(CacheEngine.options(name=name, **options[name]).bind(
            embedder, engine_cache_config(cfg), model_tag(cfg.encoder), shard, cfg.shards))
    return Ingress.options(**options["Ingress"]).bind(
        engines[0] if cfg.shards == 1 else engines, api_settings(cfg).model_dump(), online_settings(cfg))


def app_builder(args: dict[str, Any]):
    """``import_path`` target for ``serve deploy``: ``args`` are ServeConfig fields."""
    from raycache.config import build_config

    return build_app(build_config(ServeConfig, args))


def start(cfg: ServeConfig) -> str:
    """Deploy the service on the current (or a new local) Ray cluster; returns its base URL."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)  # the metrics agent still runs (Prometheus export)
    port = cfg.port or free_port(cfg.host)
    serve.start(http_options={"host": cfg.host, "port": port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{port}"


def stop(shards: int = 1, embedder: str = "deployment") -> bool:
    """Save the running cache's shard(s) (if persistence is on; in the Ingress replica with
    ``embedder: ingress``) and shut Serve down; returns whether every shard wrote a snapshot."""
    names = (["Ingress"] if embedder == "ingress"
             else [engine_deployment_name(i, shards) for i in range(shards)])
    handles = [serve.get_deployment_handle(name, app_name=APP_NAME) for name in names]
    saved = all([response.result() for response in [h.save.remote() for h in handles]])
    serve.shutdown()
    return saved


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def run(cfg: ServeConfig) -> dict:
    """``raycache serve``: start the service, print its URL; with ``cfg.blocking`` serve until
    Ctrl-C / SIGTERM, then save the cache and shut Serve down."""
    from raycache.service.serve_config import write_serve_config

    if cfg.write_serve_config:
        return {"serve_config": str(write_serve_config(cfg, cfg.write_serve_config))}
    if cfg.cache.policy_file:  # refuse a policy fitted for another model before deploying
        from raycache.calibration import load_policy

        load_policy(cfg.cache.policy_file, cfg.encoder.model)
    started = time.perf_counter()
    url = start(cfg)
    startup_s = time.perf_counter() - started
    key_env = cfg.api_key_env if os.environ.get(cfg.api_key_env) else None
    print(f"raycache serving at {url}  (docs {url}/docs; started in {startup_s:.1f} s; "
          f"API key {'from $' + key_env if key_env else 'off'}"
          f"{'; tenant keys from ' + cfg.api_keys_file if cfg.api_keys_file else ''})", flush=True)
    summary = {"url": url, "docs": f"{url}/docs", "startup_s": round(startup_s, 1),
               "api_key": bool(key_env), "api_keys_file": cfg.api_keys_file, "upstream": cfg.upstream,
               "persist_path": cfg.cache.persist_path, "shards": cfg.shards}
    if not cfg.blocking:
        return summary
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("raycache: shutting down (saving the cache)...", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary["saved"] = stop(cfg.shards, cfg.embedder)
    return summary
