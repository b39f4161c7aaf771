"""Live replay client: sequencing, retries, sharding, partial replays — against an in-process fake
of the service's HTTP API (httpx MockTransport over a real SemanticCache), no Ray, no network."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from raycache.cache.engine import SemanticCache
from raycache.cache.policy import StaticThreshold
from raycache.simulation import live, offline
from tests.test_simulation import clustered_stream


class FakeService:
    """The /v1/cache/lookup (batch form) and /v1/cache/store routes over a SemanticCache whose
    "encoder" looks vectors up by prompt. ``failures``: what the next requests get instead
    (an HTTP status or 'connect')."""

    def __init__(self, stream: pd.DataFrame, vectors: np.ndarray, threshold: float, api_key=None):
        self.vector_of = dict(zip(stream["prompt"], vectors))
        self.cache = SemanticCache(self, vectors.shape[1], policy=StaticThreshold(threshold))
        self.failures: list = []
        self.api_key = api_key
        self.seen = []

    def encode(self, texts):
        return np.stack([self.vector_of[t] for t in texts])

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.url.path)
        if self.failures:
            failure = self.failures.pop(0)
            if failure == "connect":
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(failure, json={"error": {"message": "unavailable"}})
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return httpx.Response(401, json={"error": {"message": "missing or invalid API key"}})
        body = json.loads(request.content)
        if request.url.path == "/v1/cache/lookup":
            results = self.cache.check_batch(body["prompts"], body.get("namespace", "default"))
            return httpx.Response(200, json={"results": [r.to_dict() for r in results]})
        if request.url.path == "/v1/cache/store":
            entry = self.cache.store(body["prompt"], body["response"], body.get("namespace", "default"))
            return httpx.Response(200, json={"entry_id": entry})
        return httpx.Response(404, json={"error": {"message": "not found"}})


def _client(service: FakeService, **kw) -> live.HttpReplayClient:
    kw.setdefault("backoff_s", 0.001)
    return live.HttpReplayClient("http://service", transport=httpx.MockTransport(service.handle), **kw)


def _whole_stream_shard(stream: pd.DataFrame) -> dict:
    (shard,) = live.make_shards(stream, 1)
    return shard


@pytest.mark.parametrize("batch, namespaces", [(1, 1), (7, 1), (32, 1), (8, 2)])
def test_batched_lookups_make_the_offline_decisions(batch, namespaces):
    stream, vecs = clustered_stream(240, 20, 32, 0.6, seed=2, namespaces=namespaces)
    service = FakeService(stream, vecs, threshold=0.75)
    part = _client(service, lookup_batch=batch).replay(_whole_stream_shard(stream), time.time())
    decisions, replayed = live.collect_decisions(len(stream), [part])
    expected, _ = offline.replay_vectorized(offline.ReplayStream.from_frame(stream, vecs), [0.75])[0.75]
    assert replayed.all()
    np.testing.assert_array_equal(decisions.hit, expected.hit)
    np.testing.assert_array_equal(decisions.matched_row, expected.matched_row)
    np.testing.assert_array_equal(decisions.exact, expected.exact)
    misses = int((~expected.hit).sum())
    assert len(part["store_s"]) == misses
    if namespaces == 1:  # a lookup request ends at a miss, a full batch, or the end of the shard
        assert len(part["lookup_s"]) <= misses + len(stream) // batch + 1


def test_retries_connection_errors_and_5xx_then_succeeds():
    stream, vecs = clustered_stream(30, 5, 16, 0.3, seed=1)
    service = FakeService(stream, vecs, threshold=0.8)
    service.failures = [503, "connect", 500]
    part = _client(service, max_retries=3).replay(_whole_stream_shard(stream), time.time())
    assert part["retries"] == 3 and len(part["row"]) == 30


def test_gives_up_after_max_retries_and_never_retries_4xx():
    stream, vecs = clustered_stream(10, 2, 16, 0.3, seed=1)
    service = FakeService(stream, vecs, threshold=0.8)
    service.failures = [503] * 5
    with pytest.raises(live.LiveReplayError, match="failed after 2 retries: HTTP 503"):
        _client(service, max_retries=2).replay(_whole_stream_shard(stream), time.time())
    service = FakeService(stream, vecs, threshold=0.8, api_key="secret")
    with pytest.raises(live.LiveReplayError, match="refused: HTTP 401"):
        _client(service, api_key="wrong").replay(_whole_stream_shard(stream), time.time())
    assert service.seen == ["/v1/cache/lookup"]
    part = _client(service, api_key="secret").replay(_whole_stream_shard(stream), time.time())
    assert len(part["row"]) == 10


def test_shards_keep_groups_together_in_arrival_order():
    stream = pd.DataFrame({
        "prompt": [f"p{i}" for i in range(60)],
        "group": [f"g{i % 7}" for i in range(60)],
        "namespace": ["a" if i < 30 else "b" for i in range(60)],
        "response": [None if i % 2 else f"r{i}" for i in range(60)],
    })
    shards = live.make_shards(stream, 4)
    assert 1 < len(shards) <= 4
    assert sorted(r for s in shards for r in s["rows"]) == list(range(60))
    owner = {}
    for k, shard in enumerate(shards):
        assert shard["rows"] == sorted(shard["rows"])
        for row in shard["rows"]:
            key = (stream["namespace"][row], stream["group"][row])
            assert owner.setdefault(key, k) == k
        assert all(r.startswith("[simulated response") == (row % 2 == 1)
                   for row, r in zip(shard["rows"], shard["responses"]))


def test_duration_stops_early_and_metrics_cover_replayed_arrivals_only():
    stream, vecs = clustered_stream(200, 10, 16, 0.3, seed=4)
    service = FakeService(stream, vecs, threshold=0.8)
    start = time.time()
    part = _client(service).replay(_whole_stream_shard(stream), start, rate=20.0, stop_at=start + 0.25)
    decisions, replayed = live.collect_decisions(len(stream), [part])
    assert 1 <= replayed.sum() < 100 and replayed[0]
    assert replayed[: int(replayed.sum())].all()  # one shard, in order: a prefix
    sub_stream, sub = live._only(stream, decisions, replayed)
    assert len(sub_stream) == len(sub) == replayed.sum()
    assert (sub.matched_row < len(sub)).all()


def test_hits_on_entries_from_before_the_replay_have_unknown_origin():
    parts = [{"row": [0, 1, 2], "hit": [False, True, True], "entry_id": [10, 10, 99],
              "similarity": [None, 0.93, 0.97], "exact": [False, False, False]}]
    decisions, replayed = live.collect_decisions(3, parts)
    assert decisions.matched_row.tolist() == [-1, 0, -1] and replayed.all()
    assert np.isnan(decisions.similarity[0]) and decisions.similarity[1] == pytest.approx(0.93)
