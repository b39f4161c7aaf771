"""Online verification over real HTTP: the proxy (uvicorn on loopback) with an in-test upstream
(another uvicorn server) and the reference judge; the threshold rises from a too-low start, the
verified pairs land in a Parquet folder that the training reader takes, and unverified requests
never wait for the judge. Also the serve wiring of --policy-file and --online."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request

from raycache.cache import SemanticCache, StaticThreshold
from raycache.cache.online_policy import OnlinePolicy, OnlineSettings
from raycache.config import ServeConfig
from raycache.data import read_pairs
from raycache.service.api import ApiSettings, EngineBackend, create_app
from raycache.service.verify import (Judge, PairSink, VerifyingBackend, engine_cache_config,
                                     online_settings)
from tests.http_server import serving
from tests.test_simulation import clustered_stream


def upstream_app(calls: list) -> FastAPI:
    """Answers 'answer g<k>' for a prompt 'question <k> phrased way <p>': one response per group."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        calls.append(body)
        prompt = body["messages"][-1]["content"]
        return {"id": "up", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": f"answer g{prompt.split()[1]}"}}]}

    return app


class LookupEncoder:
    """'Embeds' a prompt as its planted vector (clustered_stream's)."""

    dim = 32

    def __init__(self, vector_of):
        self.vector_of = vector_of

    def encode(self, texts, batch_size=64, progress=False):
        return np.stack([self.vector_of[t] for t in texts])


def test_online_verification_over_http_raises_a_too_low_threshold(tmp_path):
    stream, vecs = clustered_stream(700, 40, 32, 1.5, seed=3)
    encoder = LookupEncoder(dict(zip(stream["prompt"], vecs)))
    # far too low a start: most false hits lie far above it, so verify those more often than the default
    policy = OnlinePolicy(0.35, OnlineSettings(delta=0.02, min_verified=20, verify_far=0.3), seed=0)
    cache = SemanticCache(encoder, 32, policy=StaticThreshold(policy.candidate_floor))
    sink = PairSink(str(tmp_path / "verified"), flush_rows=25)
    backend = VerifyingBackend(EngineBackend(cache), policy, Judge("reference"), sink)
    calls: list = []
    with serving(upstream_app(calls)) as upstream_url:
        app = create_app(backend, ApiSettings(upstream=upstream_url + "/v1"))
        with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            wrong = []
            for prompt, group in zip(stream["prompt"], stream["group"]):
                r = client.post("/v1/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": prompt}]})
                assert r.status_code == 200
                answer = r.json()["choices"][0]["message"]["content"]
                wrong.append(answer != f"answer {group}")
            time.sleep(0.5)  # the background judges finish
            stats = client.get("/v1/cache/stats").json()
    online = stats["online"]["namespaces"]["default"]
    assert online["verified"] >= 20 and online["wrong"] > 0 and online["threshold_changes"] >= 1
    assert online["threshold"] > 0.5 and stats["online"]["namespaces"]["default"]["false_hit_ucb"] >= 0
    assert stats["hits"] == stats["online"]["served"]["hits"]  # what callers got, not candidates
    # verified hits cost one upstream call each, and each caller got the upstream's (right) answer
    misses = stats["lookups"] - stats["hits"]
    assert len(calls) == misses
    assert stats["online"]["served"]["verified_hits"] / len(stream) <= 0.10
    # a static 0.35 answers ~27% of requests wrongly here; once the threshold has risen, none
    assert np.mean(wrong[:150]) > 0.05 and np.mean(wrong[len(wrong) // 2:]) <= 0.02
    sink.flush()
    pairs = read_pairs(str(tmp_path / "verified"))
    assert len(pairs) == online["verified"] and set(pairs["label"].unique()) <= {0.0, 1.0}
    assert {"prompt_a", "prompt_b", "label", "similarity", "kind"} <= set(pairs.columns)


def test_unverified_requests_never_wait_for_the_judge():
    release = threading.Event()

    class SlowJudge:
        name = "slow"

        def judge(self, *args):
            release.wait(10)
            return 0.0

    class Inner:
        async def lookup(self, prompts, namespace="default", histories=None):
            return [{"hit": True, "response": "r", "similarity": 0.91, "matched_prompt": "m",
                     "entry_id": 1, "exact": False} for _ in prompts]

        async def store(self, *a, **k):
            return 2

        async def stats(self):
            return {"lookups": 0}

        async def clear(self, namespace=None):
            return 0

    settings = OnlineSettings(verify_near=1.0, verify_far=0.0, near_margin=0.05)
    backend = VerifyingBackend(Inner(), OnlinePolicy(0.9, settings), SlowJudge())

    async def scenario():
        (first,) = await backend.lookup(["q"])  # near the threshold: picked for verification
        assert not first["hit"]
        started = time.perf_counter()
        await backend.store("q", "fresh answer")  # schedules the judge, does not wait for it
        assert time.perf_counter() - started < 1.0 and backend._tasks
        backend.policy.settings.verify_near = 0.0
        (second,) = await backend.lookup(["q2"])  # not verified: served while the judge blocks
        assert second["hit"] and second["response"] == "r"
        release.set()
        await backend.drain()
        assert backend.policy.stats()["namespaces"]["default"]["verified"] == 1

    asyncio.run(scenario())


def test_serve_wiring_starts_from_the_policy_file_and_gives_the_engine_the_floor(tmp_path):
    from raycache import calibration as cal

    counts = cal.counts_from_outcomes(np.linspace(0, 1, 5000), np.linspace(0, 1, 5000) < 0.5,
                                      cal.calibration_thresholds())
    pf = cal.fit_policy(counts, 0.05)
    pf.write(tmp_path / "policy.json")
    cfg = ServeConfig(cache={"policy_file": str(tmp_path / "policy.json")}, verify={"online": True})
    setup = online_settings(cfg)
    assert setup["threshold"] == pf.threshold and setup["settings"]["delta"] == 0.05
    engine_cfg = engine_cache_config(cfg)
    assert engine_cfg["policy_file"] is None and engine_cfg["policy"] == "static"
    assert engine_cfg["threshold"] == pytest.approx(pf.threshold - 0.05 - 0.03)
    assert online_settings(ServeConfig()) is None
    assert engine_cache_config(ServeConfig()) == ServeConfig().cache.model_dump()
