"""The live replay's adaptive lookup batches (what run_live uses): the same decisions as offline,
and fewer prompts sent for embedding than fixed batches that a miss cuts short."""

import time

import numpy as np
import pytest

from raycache.simulation import live, offline
from tests.test_simulation import clustered_stream
from tests.test_simulation_live import FakeService, _client, _whole_stream_shard


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_adaptive_batches_make_the_offline_decisions_with_fewer_prompts_sent(batch):
    stream, vecs = clustered_stream(240, 20, 32, 0.6, seed=2)
    expected, _ = offline.replay_vectorized(offline.ReplayStream.from_frame(stream, vecs), [0.75])[0.75]
    sent = {}
    for adaptive in (False, True):
        service = FakeService(stream, vecs, threshold=0.75)
        client = _client(service, lookup_batch=batch, adaptive_batch=adaptive)
        prompts_sent = []
        post = client._post

        def counting(path, payload, post=post, prompts_sent=prompts_sent):
            if path == "/v1/cache/lookup":
                prompts_sent.append(len(payload["prompts"]))
            return post(path, payload)

        client._post = counting
        part = client.replay(_whole_stream_shard(stream), time.time())
        decisions, replayed = live.collect_decisions(len(stream), [part])
        assert replayed.all()
        np.testing.assert_array_equal(decisions.hit, expected.hit)
        np.testing.assert_array_equal(decisions.matched_row, expected.matched_row)
        sent[adaptive] = sum(prompts_sent)
    assert sent[True] <= sent[False]
    if batch == 32:
        assert sent[True] < 0.6 * sent[False]
