"""One stream replayed offline (Ray Data embedding + engine decisions) and live (HTTP client actors
against the Ray Serve service) on a local Ray: the same hit/miss decisions for the same stream, model
and threshold. One Serve start for the module, with ``embedder: ingress`` (the cache and its encoder in
the one Ingress replica; the other service tests run the Embedder and CacheEngine deployments)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from raycache.config import CacheConfig, ServeConfig, SimulateConfig
from raycache.simulation import offline

pytestmark = pytest.mark.ray

MARGIN = 2e-3  # no lookup's best similarity this close to the threshold (service vectors differ ~1e-6)


@pytest.fixture(scope="module")
def stream_path(tmp_path_factory):
    from raycache import workload

    prompts = workload.generate_prompts(seed=0)
    pool = prompts[(prompts["split"] == "test") & (prompts["domain"] == prompts["domain"].iloc[0])]
    stream = workload.generate_stream(pool, 100, seed=3)
    path = tmp_path_factory.mktemp("sim") / "stream.jsonl"
    stream.to_json(path, orient="records", lines=True)
    return path


@pytest.fixture(scope="module")
def offline_run(ray_local, stream_path, tmp_path_factory):
    """Sweep offline (Ray Data embeds the stream), pick a threshold no decision is close to, and
    replay offline once more at that threshold (reusing the written embeddings)."""
    from raycache import simulation

    out = tmp_path_factory.mktemp("offline")
    sweep = simulation.run(SimulateConfig(stream=str(stream_path), out=str(out / "sweep"),
                                          thresholds=[round(0.6 + 0.01 * i, 2) for i in range(36)]))
    embeddings = sweep["models"]["base"]["embeddings"]
    stream = simulation.read_stream_frame(SimulateConfig(stream=str(stream_path), out=str(out)))
    rs = offline.ReplayStream.from_frame(stream, np.load(embeddings))
    thresholds = [round(0.6 + 0.005 * i, 3) for i in range(70)]
    chosen = None
    for t, (dec, _) in offline.replay_vectorized(rs, thresholds).items():
        semantic = dec.hit & ~dec.exact
        sims = dec.similarity[~dec.exact & np.isfinite(dec.similarity)]
        if semantic.sum() >= 3 and (~dec.hit).sum() >= 3 and np.abs(sims - t).min() > MARGIN:
            chosen = t
            break
    assert chosen is not None, "no threshold with a safe margin on this stream"
    single = simulation.run(SimulateConfig(stream=str(stream_path), out=str(out / "single"),
                                           threshold=chosen, embeddings=embeddings))
    return {"threshold": chosen, "report": single, "sweep": sweep}


@pytest.fixture(scope="module")
def service_url(ray_local, offline_run, tmp_path_factory):
    from ray import serve

    from raycache.service import app

    # embedder: ingress: one Serve deployment holding the cache and its encoder; the replay must
    # make exactly the offline decisions through it too
    persist = tmp_path_factory.mktemp("ingress") / "cache"
    cfg = ServeConfig(cache=CacheConfig(threshold=offline_run["threshold"], capacity=None,
                                        persist_path=str(persist), persist_interval_s=3600),
                      port=0, blocking=False, embedder="ingress")
    url = app.start(cfg)
    yield url
    serve.shutdown()


def test_offline_sweep_report(offline_run):
    report = json.loads(open(offline_run["sweep"]["report"]).read())
    entry = report["models"]["base"]
    assert report["arrivals"] == 100 and report["correctness"] == "group"
    assert len(entry["sweep"]) == 36 and entry["embed_seconds"] > 0
    hit_rates = [m["hit_rate"] for m in entry["sweep"]]
    assert hit_rates[0] >= hit_rates[-1]  # a lower threshold hits at least as often here
    assert 0 < report["oracle_hit_rate"] < 1


def _clear(url: str) -> None:
    import httpx

    httpx.delete(f"{url}/v1/cache", timeout=30).raise_for_status()


def test_live_replay_makes_the_offline_decisions(offline_run, service_url, stream_path, tmp_path):
    from raycache import simulation

    _clear(service_url)
    report = simulation.run(SimulateConfig(stream=str(stream_path), out=str(tmp_path),
                                           endpoint=service_url, concurrency=1, lookup_batch=8,
                                           threshold=offline_run["threshold"]))
    offline_dec = pd.read_parquet(offline_run["report"]["models"]["base"]["decisions"])
    live_dec = pd.read_parquet(report["decisions"])
    assert live_dec["replayed"].all()
    assert live_dec["hit"].tolist() == offline_dec["hit"].tolist()
    assert live_dec["matched_row"].tolist() == offline_dec["matched_row"].tolist()
    assert live_dec["exact"].tolist() == offline_dec["exact"].tolist()
    offline_report = json.loads(open(offline_run["report"]["report"]).read())
    offline_metrics = offline_report["models"]["base"]["sweep"][0]
    for key in ("hits", "correct_hits", "false_hits", "hit_rate", "false_hit_rate"):
        assert report["metrics"][key] == offline_metrics[key]
    assert report["lookup_latency"]["p99_ms"] >= report["lookup_latency"]["p50_ms"] > 0
    assert report["throughput_arrivals_per_s"] > 0 and report["retries"] == 0
    assert report["service_stats"]["entries"] == offline_metrics["llm_calls"]
    saved = json.loads((tmp_path / "simulation.json").read_text())
    assert saved["mode"] == "live" and saved["metrics"] == report["metrics"]


def test_live_replay_with_two_client_actors_and_a_rate_cap(service_url, stream_path, tmp_path):
    from raycache import simulation

    _clear(service_url)
    report = simulation.run(SimulateConfig(stream=str(stream_path), out=str(tmp_path),
                                           endpoint=service_url, concurrency=2, rate=400.0,
                                           lookup_batch=4))
    assert report["replayed"] == report["arrivals"] == 100 and report["concurrency"] == 2
    m = report["metrics"]
    assert m["hits"] + m["llm_calls"] == 100 and m["correct_hits"] + m["false_hits"] == m["hits"]
    assert report["store_latency"]["count"] == m["llm_calls"]
    assert report["service_stats"]["entries"] == m["llm_calls"]


def test_the_ingress_holds_the_cache_and_saves_it_on_request(service_url):
    import httpx
    from ray import serve

    from raycache.service.serve_config import APP_NAME

    assert sorted(serve.status().applications[APP_NAME].deployments) == ["Ingress"]
    _clear(service_url)
    stored = httpx.post(f"{service_url}/v1/cache/store", timeout=60,
                        json={"prompt": "what is the tallest mountain?", "response": "Everest"})
    stored.raise_for_status()
    hit = httpx.post(f"{service_url}/v1/cache/lookup", json={"prompt": "what is the tallest mountain?"},
                     timeout=60).json()
    assert hit["hit"] and hit["response"] == "Everest"
    assert serve.get_deployment_handle("Ingress", app_name=APP_NAME).save.remote().result() is True
    stats = httpx.get(f"{service_url}/v1/cache/stats", timeout=60).json()
    assert stats["entries"] == 1 and stats["persistence"]["enabled"]
