"""Namespace shards (``raycache serve --shards N``): stable routing, one backend over N shards
(routing, isolation, stats and clear fan-out, per-shard persistence), in process; then over real
HTTP on Ray Serve with two shards, each embedding in its own replica (``embedder: engine``): a shard killed between snapshots restores its own snapshot while
the other keeps serving, and 16 concurrent cache-aside clients get no 5xx."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raycache.config import CacheConfig, ConfigError, ServeConfig, build_config
from raycache.service.app import CacheEngine, app_builder, free_port, run
from raycache.service.serve_config import (ENGINE_ENV_VARS, ENGINE_NUM_CPUS, INGRESS_NUM_CPUS,
                                           deployment_options, engine_embedder_threads, serve_config)
from raycache.service.shards import ShardedBackend, merge_stats, shard_of, shard_persist_path
from tests.test_service_engine import FakeEmbedderHandle


def namespaces_on(shard: int, shards: int, n: int, prefix: str = "tenant") -> list[str]:
    """The first ``n`` namespaces ``<prefix>-<i>`` that live on ``shard``."""
    found, i = [], 0
    while len(found) < n:
        name = f"{prefix}-{i}"
        if shard_of(name, shards) == shard:
            found.append(name)
        i += 1
    return found


# ----------------------------------------------------------------------------- routing
def test_shard_of_is_stable_across_processes_and_spreads_namespaces():
    names = [f"tenant-{i}" for i in range(2000)]
    here = [shard_of(n, 4) for n in names]
    script = ("import sys; from raycache.service.shards import shard_of; "
              "print(','.join(str(shard_of(f'tenant-{i}', 4)) for i in range(2000)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's own str hash differs per process
    there = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                           check=True).stdout.strip().split(",")
    assert here == [int(s) for s in there]
    shares = [here.count(s) / len(here) for s in range(4)]
    assert all(0.2 < share < 0.3 for share in shares), shares
    assert {shard_of(n, 1) for n in names} == {0}
    with pytest.raises(ValueError, match="shards must be >= 1"):
        shard_of("x", 0)


def test_shard_persist_paths_name_the_shard_and_the_shard_count():
    assert shard_persist_path("/data/cache.npz", 0, 1) == "/data/cache.npz"
    assert shard_persist_path(None, 1, 2) is None
    paths = {shard_persist_path("s3://bucket/cache/", i, 2) for i in range(2)}
    assert paths == {"s3://bucket/cache.shard-0-of-2", "s3://bucket/cache.shard-1-of-2"}
    assert shard_persist_path("/d/c.npz", 0, 2) != shard_persist_path("/d/c.npz", 0, 3)


def test_embedder_in_the_engine_drops_the_embedder_deployment_and_gives_its_cpus_to_each_shard():
    cfg = ServeConfig(shards=2, embedder="engine", embedder_num_cpus=0.5, embedder_max_replicas=4)
    options = deployment_options(cfg)
    assert list(options) == ["CacheEngine-0", "CacheEngine-1", "Ingress"]
    assert options["CacheEngine-1"]["ray_actor_options"]["num_cpus"] == ENGINE_NUM_CPUS + 0.5
    assert "runtime_env" not in options["CacheEngine-1"]["ray_actor_options"]  # it embeds
    served = deployment_options(ServeConfig(shards=2))["CacheEngine-1"]["ray_actor_options"]
    assert served["runtime_env"]["env_vars"] == ENGINE_ENV_VARS  # engines that only search and store
    assert engine_embedder_threads(cfg) == 2 and engine_embedder_threads(ServeConfig()) == 1
    app = ServeDeploySchema.model_validate(serve_config(cfg)).applications[0]
    assert [d.name for d in app.deployments] == list(options) and app.args["embedder"] == "engine"
    assert app_builder(app.args) is not None
    with pytest.raises(ConfigError, match="embedder"):
        build_config(ServeConfig, {"embedder": "gpu"})


def test_embedder_in_the_ingress_is_one_deployment_holding_one_shard():
    cfg = ServeConfig(embedder="ingress", embedder_num_cpus=0.5)
    options = deployment_options(cfg)
    assert list(options) == ["Ingress"] and options["Ingress"]["num_replicas"] == 1
    actor = options["Ingress"]["ray_actor_options"]
    assert actor["num_cpus"] == INGRESS_NUM_CPUS + ENGINE_NUM_CPUS + 0.5
    assert "runtime_env" not in actor  # the malloc threshold would slow its encoder
    app = ServeDeploySchema.model_validate(serve_config(cfg)).applications[0]
    assert [d.name for d in app.deployments] == ["Ingress"]
    built = app_builder(app.args)
    assert built is not None
    with pytest.raises(ConfigError, match="shards 1"):
        build_config(ServeConfig, {"embedder": "ingress", "shards": 2})


def test_serve_config_yaml_has_one_engine_deployment_per_shard():
    document = serve_config(ServeConfig(shards=3, cache=CacheConfig(threshold=0.8)))
    schema = ServeDeploySchema.model_validate(yaml.safe_load(yaml.safe_dump(document)))
    names = [d.name for d in schema.applications[0].deployments]
    assert names == ["Embedder", "CacheEngine-0", "CacheEngine-1", "CacheEngine-2", "Ingress"]
    assert all(d.num_replicas == 1 for d in schema.applications[0].deployments if d.name.startswith("CacheEngine"))
    assert schema.applications[0].args["shards"] == 3


def test_merge_stats_sums_counts_and_keeps_the_worst_percentiles():
    parts = [{"entries": 3, "lookups": 10, "hits": 4, "hit_rate": 0.4, "index": "flat",
              "embed_window_tokens": 256, "lookup_ms": {"p50": 1.0, "p99": 9.0},
              "persistence": {"enabled": True, "loaded_entries": 2, "load_error": None, "last_saved_at": 50.0}},
             {"entries": 5, "lookups": 0, "hits": 0, "hit_rate": None, "index": "flat",
              "embed_window_tokens": 256, "lookup_ms": {"p50": 2.0, "p99": 4.0},
              "persistence": {"enabled": True, "loaded_entries": 1, "load_error": "bad file", "last_saved_at": 40.0}}]
    merged = merge_stats(parts)
    assert (merged["entries"], merged["lookups"], merged["hits"]) == (8, 10, 4)
    assert merged["hit_rate"] == 0.4 and merged["embed_window_tokens"] == 256 and merged["index"] == "flat"
    assert merged["lookup_ms"] == {"p50": 2.0, "p99": 9.0}
    assert merged["persistence"] == {"enabled": True, "loaded_entries": 3, "load_error": "bad file",
                                     "last_saved_at": 40.0}
    assert [s["entries"] for s in merged["shards"]] == [3, 5]


# ----------------------------------------------------------------------------- in process
def start_shard(path, shard: int, shards: int):
    """CacheEngine replica object ``shard`` of ``shards`` built in process (Serve bypassed)."""
    engine_cls = CacheEngine.func_or_class
    engine = engine_cls.__new__(engine_cls)
    cfg = CacheConfig(persist_path=str(path), persist_interval_s=3600, threshold=0.9)
    asyncio.run(engine.__init__(FakeEmbedderHandle(), cfg.model_dump(), "hashing", shard, shards))
    return engine


def test_sharded_backend_routes_isolates_fans_out_and_persists_per_shard(tmp_path):
    path = tmp_path / "cache.npz"
    engines = [start_shard(path, i, 2) for i in range(2)]
    backend = ShardedBackend(engines)
    a0, b0 = namespaces_on(0, 2, 2)
    (a1,) = namespaces_on(1, 2, 1)
    prompt = "how do I reset my router password"

    async def scenario():
        ids = {ns: await backend.store(prompt, f"answer for {ns}", ns) for ns in (a0, a1)}
        await backend.store_batch(["what is the boiling point of water", "who wrote hamlet"],
                                  ["100 C", "Shakespeare"], b0)
        found = {ns: (await backend.lookup([prompt + " please"], ns))[0] for ns in (a0, a1, b0)}
        return ids, found, await backend.stats()

    ids, found, stats = asyncio.run(scenario())
    assert found[a0]["hit"] and found[a0]["response"] == f"answer for {a0}" and found[a0]["entry_id"] == ids[a0]
    assert found[a1]["hit"] and found[a1]["response"] == f"answer for {a1}"
    assert not found[b0]["hit"]  # same shard as a0, other namespace: never shared
    assert [len(e.cache) for e in engines] == [3, 1]  # each namespace on its own shard only
    assert stats["entries"] == 4 and [s["entries"] for s in stats["shards"]] == [3, 1]
    assert stats["lookups"] == 3 and stats["hits"] == 2

    assert asyncio.run(backend.clear(b0)) == 2 and [len(e.cache) for e in engines] == [1, 1]
    for engine in engines:
        engine.__del__()  # graceful shutdown: each shard saves its own file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz.shard-0-of-2", "cache.npz.shard-1-of-2"]
    restarted = start_shard(path, 1, 2)  # shard 1 alone comes back with its own entries
    again = asyncio.run(restarted.lookup([prompt], a1))[0]
    assert again["hit"] and again["entry_id"] == ids[a1]
    assert asyncio.run(restarted.stats())["persistence"]["loaded_entries"] == 1
    other_count = start_shard(path, 1, 3)  # another shard count does not read these files
    assert len(other_count.cache) == 0
    for engine in (restarted, other_count):
        engine.saver.stop(final_save=False)
    assert asyncio.run(ShardedBackend([restarted, other_count]).clear()) == 1


# ----------------------------------------------------------------------------- Ray Serve, two shards
@pytest.fixture(scope="module")
def sharded(ray_local, tmp_path_factory):
    from ray import serve

    cfg = ServeConfig(port=free_port(), blocking=False, shards=2, embedder="engine",  # each shard embeds
                      cache=CacheConfig(threshold=0.85, persist_interval_s=1.0,
                                        persist_path=str(tmp_path_factory.mktemp("shards") / "cache.npz")))
    try:
        url = run(cfg)["url"]
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client, cfg
    finally:
        serve.shutdown()


def test_two_shards_over_http_count_all_entries_and_clear_everywhere(sharded):
    from ray import serve

    client, _ = sharded
    deployments = serve.status().applications["raycache"].deployments
    assert sorted(deployments) == ["CacheEngine-0", "CacheEngine-1", "Ingress"]  # embedder: engine
    client.delete("/v1/cache")
    spread = namespaces_on(0, 2, 2) + namespaces_on(1, 2, 1)
    for ns in spread:
        reply = client.post("/v1/cache/store", json={"prompts": [f"what is the capital of {ns}?", f"who runs {ns}?"],
                                                     "responses": ["A", "B"], "namespace": ns})
        assert reply.status_code == 200, reply.text
    stats = client.get("/v1/cache/stats").json()
    assert stats["entries"] == 6 and [s["entries"] for s in stats["shards"]] == [4, 2]
    hit = client.post("/v1/cache/lookup", json={"prompt": f"who runs {spread[2]}?", "namespace": spread[2]}).json()
    empty = namespaces_on(1, 2, 2)[1]  # same shard as spread[2], nothing stored in it
    miss = client.post("/v1/cache/lookup", json={"prompt": f"who runs {spread[2]}?", "namespace": empty}).json()
    assert hit["hit"] and hit["response"] == "B" and not miss["hit"]
    cleared = client.delete("/v1/cache").json()
    assert cleared["removed"] == 6 and client.get("/v1/cache/stats").json()["entries"] == 0


def test_killing_one_shard_restores_its_snapshot_while_the_other_serves(sharded):
    from tests.test_faults_service import kill, lookup_until_answered, replica

    client, cfg = sharded
    client.delete("/v1/cache")
    (ns0,), (ns1,) = namespaces_on(0, 2, 1, "kill"), namespaces_on(1, 2, 1, "kill")
    prompts = [f"Which river flows through city number {i}?" for i in range(6)]
    ids = {}
    for ns in (ns0, ns1):
        reply = client.post("/v1/cache/store", json={"prompts": prompts, "responses": [f"{ns}: {p}" for p in prompts],
                                                     "namespace": ns})
        assert reply.status_code == 200, reply.text
        ids[ns] = reply.json()["entry_ids"]
    stored = time.time()
    deadline = stored + 30
    while (client.get("/v1/cache/stats").json()["persistence"]["last_saved_at"] or 0) < stored:
        assert time.time() < deadline, "no periodic snapshot of both shards within 30 s"
        time.sleep(0.2)
    killed = kill("CacheEngine-1")
    during = client.post("/v1/cache/lookup", json={"prompts": prompts, "namespace": ns0})
    assert during.status_code == 200 and all(r["hit"] for r in during.json()["results"])  # shard 0 unaffected
    found, retries = lookup_until_answered(client, prompts, ns1)
    assert replica("CacheEngine-1")[0] != killed
    assert [r["entry_id"] for r in found] == ids[ns1] and all(r["exact"] for r in found)
    shards = client.get("/v1/cache/stats").json()["shards"]
    assert shards[1]["persistence"]["loaded_entries"] == len(prompts)
    print(f"\nshard 1 killed: back after {retries} retries with {len(prompts)} entries; shard 0 kept serving")


def test_sixteen_concurrent_cache_aside_clients_get_no_5xx(sharded):
    client, _ = sharded
    client.delete("/v1/cache")
    statuses: list[int] = []
    lock = threading.Lock()

    def cache_aside(worker: int) -> None:
        ns = f"client-{worker % 4}"
        with httpx.Client(base_url=str(client.base_url), timeout=120) as own:
            for i in range(8):
                prompt = f"question {i % 5} about topic {worker % 3}"
                got = own.post("/v1/cache/lookup", json={"prompt": prompt, "namespace": ns})
                codes = [got.status_code]
                if got.status_code == 200 and not got.json()["hit"]:
                    codes.append(own.post("/v1/cache/store", json={"prompt": prompt, "response": f"r{i}",
                                                                   "namespace": ns}).status_code)
                with lock:
                    statuses.extend(codes)

    threads = [threading.Thread(target=cache_aside, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) >= 16 * 8 and set(statuses) == {200}
    stats = client.get("/v1/cache/stats").json()
    assert stats["lookups"] >= 16 * 8 and stats["entries"] == sum(s["entries"] for s in stats["shards"]) > 0


def test_a_shard_fits_the_pair_calibrated_policy_from_the_embedders_vectors(tmp_path):
    """The replica builds its policy with the library's ``policy_from_config`` (one place), fed by
    the Embedder's vectors: the same threshold as fitting on the same encoder in process."""
    import json

    from raycache.cache.engine import policy_from_config
    from tests.test_cache import HashingEncoder

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt_a": f"how do I fix error {i}", "prompt_b": f"how do I fix error {i} please", "label": 1}
            for i in range(40)]
    rows += [{"prompt_a": f"capital of country {i}", "prompt_b": f"currency of country {i + 1}", "label": 0}
             for i in range(40)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = CacheConfig(policy="calibrated", calibration_pairs=str(pairs), target_false_hit=0.1)
    engine_cls = CacheEngine.func_or_class
    engine = engine_cls.__new__(engine_cls)
    asyncio.run(engine.__init__(FakeEmbedderHandle(), cfg.model_dump(), "hashing", 1, 2))
    expected = policy_from_config(cfg, HashingEncoder())
    assert engine.cache.policy.describe() == expected.describe()
    assert engine.cache.policy.describe()["policy"] == "calibrated"
