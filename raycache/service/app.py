"""The Ray Serve application: ``Embedder`` -> ``CacheEngine`` <- ``Ingress`` (FastAPI).

* ``Embedder``: the sentence encoder, requests batched across callers with ``@serve.batch``;
  autoscaling replicas (CPU, or GPU when ``embedder_num_gpus`` > 0). With each vector it returns the
  key of the prompt's text beyond the model's window, which scopes long prompts (an exact match).
* ``CacheEngine``: one stateful replica owning the SemanticCache; loads the snapshot on start,
  saves it every ``persist_interval_s`` when changed and on shutdown; exports Ray metrics
  (Prometheus through Ray's metrics agent), gauges updated on every request.
* ``Ingress``: the FastAPI app of :mod:`raycache.service.api`.

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

from raycache.cache.engine import SemanticCache, load_calibration_pairs, row_cosines
from raycache.cache.persist import PeriodicSnapshot, SnapshotError, quarantine
from raycache.cache.policy import CalibratedThreshold
from raycache.config import CacheConfig, ConfigError, EncoderConfig, ServeConfig
from raycache.cache.scope import tail_key
from raycache.io import free_port
from raycache.service.api import ApiSettings, EngineBackend, create_app, key_digest, read_api_keys
from raycache.service.serve_config import APP_NAME, deployment_options

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


def model_tag(encoder_cfg: EncoderConfig) -> str:
    """Which encoder made a snapshot's vectors: the model folder / id, or 'default'."""
    return encoder_cfg.model or "default"


@serve.deployment(name="Embedder", max_ongoing_requests=32)
class Embedder:
    """Texts -> L2-normalised float32 vectors; concurrent requests are batched together."""

    def __init__(self, encoder_cfg: dict, max_batch_size: int, batch_wait_s: float):
        from raycache.encoder import Encoder

        cfg = EncoderConfig(**encoder_cfg)
        self.encoder = Encoder.load(cfg.model, device=cfg.device, max_length=cfg.max_length)
        self.batch_size = cfg.batch_size
        self._embed_batch.set_max_batch_size(max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batch_wait_s)

    def dim(self) -> int:
        return self.encoder.dim

    def window(self) -> int:
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


class _EngineMetrics:
    """Ray metrics of the cache (exported to Prometheus by Ray's metrics agent)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.lookups = metrics.Counter("raycache_lookups", "Prompts looked up, by result.",
                                       tag_keys=("result",))
        self.latency = metrics.Histogram("raycache_lookup_latency_ms",
                                         "Lookup call latency incl. embedding (ms).",
                                         boundaries=LATENCY_BUCKETS_MS)
        self.stores = metrics.Counter("raycache_stores", "Responses stored.")
        self.removed = metrics.Counter("raycache_removed_entries", "Entries evicted or expired.",
                                       tag_keys=("reason",))
        self.entries = metrics.Gauge("raycache_entries", "Entries in the cache.")
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
    """The one stateful replica: a SemanticCache fed vectors by the Embedder."""

    async def __init__(self, embedder: DeploymentHandle, cache_cfg: dict, tag: str):
        cfg = CacheConfig(**cache_cfg)
        self.embedder = embedder
        dim = await embedder.dim.remote()
        self.window = await embedder.window.remote() if hasattr(embedder, "window") else None
        self.tag = tag
        policy = await self._policy(cfg)
        self.cache = SemanticCache.from_config(cfg, encoder=None, dim=dim, policy=policy, model_tag=tag)
        self.backend = EngineBackend(self.cache, embed=self._embed)
        self.metrics = _EngineMetrics()
        self.snapshot_status = {"loaded_entries": 0, "load_error": None, "quarantined_to": None}
        self.saver: Optional[PeriodicSnapshot] = None
        if cfg.persist_path:
            await asyncio.to_thread(self._load, cfg.persist_path)
            self.saver = PeriodicSnapshot(cfg.persist_path, self.cache.snapshot,
                                          lambda: self.cache.version, cfg.persist_interval_s).start()

    async def _embed(self, texts: list[str]) -> tuple[np.ndarray, list[str]]:
        return await self.embedder.embed_with_tails.remote(texts)

    async def _policy(self, cfg: CacheConfig):
        if cfg.policy_file:  # calibrated offline by `raycache calibrate`; never refitted here
            from raycache.calibration import load_policy

            return load_policy(cfg.policy_file, self.tag).decision_policy(cfg.policy_file)
        if cfg.policy != "calibrated":
            return None  # from_config builds the static policy
        if not cfg.calibration_pairs:
            raise ConfigError("cache.policy 'calibrated' needs cache.calibration_pairs")
        prompts_a, prompts_b, labels = load_calibration_pairs(cfg.calibration_pairs)
        sims = row_cosines((await self._embed(prompts_a))[0], (await self._embed(prompts_b))[0])
        return CalibratedThreshold.fit(sims, labels, cfg.target_false_hit, cfg.confidence)

    def _load(self, path: str) -> None:
        try:
            self.snapshot_status["loaded_entries"] = self.cache.restore(path)
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
    """The CacheBackend interface over a CacheEngine deployment handle."""

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


@serve.deployment(name="Ingress", max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    """HTTP entry point: the FastAPI app, built on the replica over the CacheEngine handle."""

    def __init__(self, engine: DeploymentHandle, settings: dict, online: Optional[dict] = None):
        self.engine = engine
        self.settings = ApiSettings(**settings)
        self.online = online  # online verification (raycache.service.verify), None = off

    def __serve_build_asgi_app__(self):
        from raycache.service.verify import wrap_backend

        return create_app(wrap_backend(_RemoteBackend(self.engine), self.online), self.settings)


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
    """The bound Serve application (Embedder -> CacheEngine <- Ingress) for ``cfg``."""
    options = deployment_options(cfg)
    embedder = Embedder.options(**options["Embedder"]).bind(
        cfg.encoder.model_dump(), cfg.serve_batch_size, cfg.serve_batch_wait_s)
    from raycache.service.verify import engine_cache_config, online_settings

    engine = CacheEngine.options(**options["CacheEngine"]).bind(
        embedder, engine_cache_config(cfg), model_tag(cfg.encoder))
    return Ingress.options(**options["Ingress"]).bind(engine, api_settings(cfg).model_dump(),
                                                      online_settings(cfg))


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


def stop() -> bool:
    """Save the running cache (if persistence is on) and shut Serve down; returns whether a
    snapshot was written."""
    handle = serve.get_deployment_handle("CacheEngine", app_name=APP_NAME)
    saved = handle.save.remote().result()
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
               "persist_path": cfg.cache.persist_path}
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
    summary["saved"] = stop()
    return summary
