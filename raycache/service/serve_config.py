"""The Serve application's name and per-deployment options, and the Serve config YAML that
``serve deploy`` accepts, generated from a :class:`ServeConfig` (``raycache.service.app`` builds the
application with the same options; this module does not import it).

``raycache serve --write-serve-config serve.yaml [flags]`` writes it; then
``serve deploy serve.yaml`` runs the same application on a cluster (``raycache.service.app:app_builder``
rebuilds it from the ``args`` section). Deployment options (autoscaling bounds, CPUs, GPUs) are also
spelled out per deployment so operators can edit them in place.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from raycache.config import ConfigError, ServeConfig
from raycache.io import local_file_path, write_text_atomic
from raycache.service.shards import engine_deployment_name

APP_NAME = "raycache"
ENGINE_NUM_CPUS = 0.25
INGRESS_NUM_CPUS = 0.25
ENGINE_ENV_VARS = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""Environment of each CacheEngine replica's process. A fixed 128 KiB mmap threshold stops glibc
from raising it as large arrays are freed, so the engine's growing columns and index lists go back
to the OS when they are reallocated instead of staying in the heap (bench/README §6a: 2,459 ->
2,038 bytes per entry at 1M entries with the IVF index). Set only where the engine does not embed
(``embedder: deployment``): it costs an encoder in the same process ~25% of its speed (every
activation tensor over 128 KiB becomes a fresh mmap)."""

# ServeConfig fields that configure this process, not the application
_PROCESS_FIELDS = {"host", "port", "blocking", "write_serve_config"}


def engine_embedder_threads(cfg: ServeConfig) -> int:
    """Torch threads of the encoder in each CacheEngine replica (``embedder: engine``): the CPUs
    the Embedder replicas would have had at most, whole."""
    return max(1, round(cfg.embedder_num_cpus * cfg.embedder_max_replicas))


def deployment_options(cfg: ServeConfig) -> dict[str, dict]:
    """Serve options per deployment name (also written into the ``serve deploy`` YAML): the
    Embedder (unless ``embedder: engine`` or ``ingress``), one CacheEngine per shard (one replica
    each: a shard is state; none with ``embedder: ingress``), the Ingress (one replica holding
    the cache, with the engine's CPUs, with ``embedder: ingress``). ENGINE_ENV_VARS go only to
    engine replicas that do not embed."""
    in_engine = cfg.embedder in ("engine", "ingress")
    engine_cpus = ENGINE_NUM_CPUS + (cfg.embedder_num_cpus if in_engine else 0)
    if cfg.embedder == "ingress":
        return {"Ingress": {"num_replicas": 1, "ray_actor_options": {
            "num_cpus": INGRESS_NUM_CPUS + engine_cpus}}}
    embedder = {} if in_engine else {"Embedder": {
        "autoscaling_config": {
            "min_replicas": cfg.embedder_min_replicas,
            "initial_replicas": max(1, cfg.embedder_min_replicas),
            "max_replicas": max(cfg.embedder_max_replicas, cfg.embedder_min_replicas, 1),
            "target_ongoing_requests": 4},
        "max_ongoing_requests": max(32, cfg.serve_batch_size),
        "ray_actor_options": {"num_cpus": cfg.embedder_num_cpus, "num_gpus": cfg.embedder_num_gpus},
    }}
    def engine() -> dict:  # a new dict per shard (the YAML gets no aliases)
        actor = {"num_cpus": engine_cpus}
        if not in_engine:  # the threshold slows an encoder in the same process (ENGINE_ENV_VARS)
            actor["runtime_env"] = {"env_vars": dict(ENGINE_ENV_VARS)}
        return {"num_replicas": 1, "ray_actor_options": actor}

    return {
        **embedder,
        **{engine_deployment_name(shard, cfg.shards): engine() for shard in range(cfg.shards)},
        "Ingress": {"ray_actor_options": {"num_cpus": INGRESS_NUM_CPUS}},
    }


def serve_config(cfg: ServeConfig) -> dict:
    """The ``serve deploy`` document for ``cfg`` (a dict matching Serve's ServeDeploySchema)."""
    args = cfg.model_dump(mode="json", exclude=_PROCESS_FIELDS)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.host, "port": cfg.port or 8000},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "raycache.service.app:app_builder",
            "args": args,
            "deployments": [{"name": name, **options}
                            for name, options in deployment_options(cfg).items()],
        }],
    }


def write_serve_config(cfg: ServeConfig, path: str | os.PathLike) -> Path:
    """Write :func:`serve_config` as YAML to ``path`` (a local path or file:// URI); returns the
    path. ConfigError when the path is malformed or cannot be written."""
    try:
        path = local_file_path(path, "--write-serve-config")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    header = ("# raycache Serve config: `serve deploy` this file on a running Ray cluster.\n"
              "# The API key is read from the cluster's environment variable named in args.api_key_env.\n")
    try:
        write_text_atomic(path, header + yaml.safe_dump(serve_config(cfg), sort_keys=False))
    except OSError as exc:
        raise ConfigError(f"cannot write the serve config to {path}: {exc.strerror or exc}") from None
    return path
