"""The CacheEngine deployment's logic and the Serve config, without a Ray cluster: snapshot load on
start (a corrupt one is kept aside), save on shutdown, and a `serve deploy` YAML Serve accepts."""

from __future__ import annotations

import asyncio

import yaml
from ray.serve.schema import ServeDeploySchema

from raycache.cache import SemanticCache
from raycache.config import CacheConfig, ServeConfig
from raycache.service.app import CacheEngine, app_builder, run
from raycache.service.serve_config import serve_config
from tests.test_cache import DIM, HashingEncoder


class FakeEmbedderHandle:
    """Stands in for the Embedder DeploymentHandle: ``await handle.<method>.remote(...)``."""

    class _Method:
        def __init__(self, fn):
            self.fn = fn

        async def remote(self, *args):
            return self.fn(*args)

    def __init__(self) -> None:
        encoder = HashingEncoder()
        self.dim = self._Method(lambda: DIM)
        self.embed = self._Method(encoder.encode)
        self.embed_with_tails = self._Method(lambda texts: (encoder.encode(texts), [""] * len(texts)))


def start_engine(persist_path) -> object:
    """A CacheEngine replica object built in process (its Serve decorator bypassed)."""
    engine_cls = CacheEngine.func_or_class
    engine = engine_cls.__new__(engine_cls)
    cfg = CacheConfig(persist_path=str(persist_path), persist_interval_s=3600, threshold=0.9)
    asyncio.run(engine.__init__(FakeEmbedderHandle(), cfg.model_dump(), "hashing"))
    return engine


def test_engine_saves_on_shutdown_and_reloads_on_start(tmp_path):
    path = tmp_path / "cache.npz"
    engine = start_engine(path)
    entry_id = asyncio.run(engine.store("how do I reset my router password", "Hold reset.", "n"))
    engine.__del__()  # Serve calls this on graceful shutdown
    restarted = start_engine(path)
    found = asyncio.run(restarted.lookup(["how do I reset my router password please"], "n"))[0]
    assert found["hit"] and found["entry_id"] == entry_id
    persistence = asyncio.run(restarted.stats())["persistence"]
    assert persistence["loaded_entries"] == 1 and persistence["load_error"] is None
    restarted.saver.stop(final_save=False)


def test_corrupt_snapshot_is_kept_aside_and_the_engine_starts_empty(tmp_path):
    path = tmp_path / "cache.npz"
    path.write_bytes(b"garbage, not a zip")
    engine = start_engine(path)
    persistence = asyncio.run(engine.stats())["persistence"]
    assert "not a valid raycache snapshot" in persistence["load_error"]
    aside = tmp_path / persistence["quarantined_to"].rsplit("/", 1)[-1]
    assert aside.read_bytes() == b"garbage, not a zip" and not path.exists()
    asyncio.run(engine.store("a fresh entry", "x"))
    engine.__del__()
    assert len(SemanticCache.load(path)) == 1 and aside.exists()  # the bad file is not overwritten


def test_serve_config_yaml_is_accepted_by_serve(tmp_path):
    cfg = ServeConfig(port=9100, upstream="http://localhost:8001/v1",
                      cache=CacheConfig(capacity=500, threshold=0.8), embedder_max_replicas=3)
    out = run(cfg.model_copy(update={"write_serve_config": str(tmp_path / "serve.yaml")}))
    document = yaml.safe_load((tmp_path / "serve.yaml").read_text())
    assert out == {"serve_config": str(tmp_path / "serve.yaml")} and document == serve_config(cfg)
    schema = ServeDeploySchema.model_validate(document)
    app = schema.applications[0]
    assert app.import_path == "raycache.service.app:app_builder" and schema.http_options.port == 9100
    embedder = next(d for d in app.deployments if d.name == "Embedder")
    assert embedder.autoscaling_config["max_replicas"] == 3
    assert app_builder(app.args) is not None  # the builder accepts its own args
    assert app.args["cache"]["threshold"] == 0.8
