"""The labeling job on a local Ray: output schema and read-back, resume after an interruption,
the error-rate limit and relabelling failed pairs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycache.config import LabelConfig
from raycache.data import read_pairs, write_table
from raycache.io import free_port
from raycache.labeling import job

pytestmark = pytest.mark.ray


def _shards(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.startswith("part-") and p.endswith(".parquet"))


def test_label_job_on_default_data_reads_back_and_reruns_as_no_op(ray_local, tmp_path, capsys):
    from raycache import workload
    from raycache.cli import run_job

    prompts = workload.generate_prompts(seed=0)
    pairs = workload.generate_pairs(prompts[prompts["split"] == "train"], 150, seed=0)
    src, out = tmp_path / "pairs.jsonl", tmp_path / "labels"
    write_table(pairs, src)

    assert run_job("label", ["--pairs", str(src), "--out", str(out), "--rows-per-shard", "40"]) == 0
    summary = json.loads(capsys.readouterr().out)
    labelled = read_pairs(out)
    assert len(labelled) == 150 and labelled["pair_id"].is_unique
    assert list(labelled.columns) == ["prompt_a", "prompt_b", "group_a", "group_b", "answers_a",
                                      "answers_b", "pair_id", "label", "teacher", "error"]
    assert labelled["error"].isna().all() and set(labelled["teacher"]) == {"reference"}
    assert set(labelled["label"]) <= {0.0, 1.0}
    # the workload's groups decide: paraphrases are positive, everything else negative, including
    # other entities that happen to share the answer ("Where is Laos?" / "... Uzbekistan?": Asia)
    same_group = labelled["group_a"] == labelled["group_b"]
    shared_answer = np.array([bool(set(a) & set(b))
                              for a, b in zip(labelled["answers_a"], labelled["answers_b"])])
    assert (~same_group & shared_answer).sum() >= 3
    assert (labelled["label"] == same_group).all()
    assert len(_shards(out)) == 4  # 150 rows in shards of 40
    assert summary["pairs"] == summary["labelled"] == 150 and summary["errors"] == 0
    assert summary["already_labelled"] == 0
    assert summary["positive_rate"] == pytest.approx((labelled["label"] >= 0.5).mean())

    before = {name: os.path.getmtime(out / name) for name in _shards(out)}
    again = job.run(LabelConfig(pairs=str(src), out=str(out)))
    assert again["already_labelled"] == 150 and again["labelled"] == 0 and again["shards_written"] == 0
    assert {name: os.path.getmtime(out / name) for name in _shards(out)} == before


def _gold_pairs(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "prompt_a": [f"what is fact {i}?" for i in range(n)],
        "prompt_b": [f"tell me fact {i // 2 * 2}" for i in range(n)],
        "group_a": [f"g{i}" for i in range(n)],
        "group_b": [f"g{i // 2 * 2}" for i in range(n)],
    })


def test_interrupted_run_resumes_without_relabelling(ray_local, tmp_path, monkeypatch):
    pairs = _gold_pairs(60)
    src, out = tmp_path / "pairs.jsonl", tmp_path / "labels"
    write_table(pairs, src)
    cfg = LabelConfig(pairs=str(src), out=str(out), rows_per_shard=10)

    real_write = job.ShardStore.write
    writes = []

    def failing_write(self, table, name):  # the disk fills up after two shards
        writes.append(name)
        if len(writes) > 2:
            raise OSError("No space left on device (simulated)")
        return real_write(self, table, name)

    monkeypatch.setattr(job.ShardStore, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        job.run(cfg)
    monkeypatch.undo()
    first = read_pairs(out)
    assert len(first) == 20 and len(_shards(out)) == 2
    (out / ".part-killed-00003.parquet.0a1b2c3d.tmp").write_bytes(b"PAR1 half a shard")
    kept = {name: (out / name).read_bytes() for name in _shards(out)}

    summary = job.run(cfg)
    assert summary["already_labelled"] == 20 and summary["labelled"] == 40
    assert {name: (out / name).read_bytes() for name in _shards(out) if name in kept} == kept
    new = pd.concat([pd.read_parquet(out / n) for n in _shards(out) if n not in kept])
    assert not set(new["pair_id"]) & set(first["pair_id"])  # nothing labelled twice
    union = read_pairs(out)
    assert len(union) == 60 and union["pair_id"].is_unique
    assert sorted(union["prompt_a"]) == sorted(pairs["prompt_a"])
    np.testing.assert_array_equal(union.sort_values("prompt_a")["label"],
                                  pairs.assign(label=(pairs.group_a == pairs.group_b) * 1.0)
                                  .sort_values("prompt_a")["label"])
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_error_rate_limit_then_retry_errors(ray_local, tmp_path):
    pairs = _gold_pairs(10)
    pairs.loc[[2, 5, 7], ["group_a", "group_b"]] = None  # the teacher can't judge these three
    src, out = tmp_path / "pairs.jsonl", tmp_path / "labels"
    write_table(pairs, src)
    with pytest.raises(job.ErrorRateExceeded, match=r"3 of 10 pairs could not be labelled") as failure:
        job.run(LabelConfig(pairs=str(src), out=str(out), max_error_rate=0.2))
    assert failure.value.summary["errors"] == 3
    assert "no gold answers or groups for this pair" in failure.value.summary["error_examples"]
    written = read_pairs(out)
    assert len(written) == 10 and written["error"].notna().sum() == 3  # kept, with their errors
    assert written["label"].isna().sum() == 3

    write_table(_gold_pairs(10), src)  # the cause is fixed
    summary = job.run(LabelConfig(pairs=str(src), out=str(out), retry_errors=True))
    assert summary["already_labelled"] == 7 and summary["labelled"] == 3 and summary["errors"] == 0
    final = read_pairs(out)
    assert len(final) == 10 and final["pair_id"].is_unique and final["error"].isna().all()


def test_duplicate_pairs_in_the_input_are_written_once(ray_local, tmp_path):
    pairs = _gold_pairs(6)
    swapped = pairs.iloc[[0, 1]].rename(columns={"prompt_a": "prompt_b", "prompt_b": "prompt_a",
                                                  "group_a": "group_b", "group_b": "group_a"})
    src, out = tmp_path / "pairs.jsonl", tmp_path / "labels"
    write_table(pd.concat([pairs, swapped[pairs.columns]]), src)  # (b, a) is the same pair as (a, b)
    summary = job.run(LabelConfig(pairs=str(src), out=str(out)))
    assert summary["pairs"] == 8 and summary["duplicates"] == 2 and summary["labelled"] == 6
    assert read_pairs(out)["pair_id"].is_unique


@pytest.mark.slow
def test_jobs_label_py_through_ray_job_submit(tmp_path):
    """`ray job submit -- python jobs/label.py` against a fresh `ray start --head` cluster."""
    from raycache import workload

    repo = Path(__file__).resolve().parents[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    data = workload.write_default_dataset(tmp_path / "data", n_train_pairs=200, n_test_pairs=20,
                                          n_arrivals=20)
    out = tmp_path / "labels"
    dashboard = free_port()
    # a token file written by an earlier ray.init turns on token auth for `ray start`
    env = {**os.environ, "RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").exists() \
        else dict(os.environ)
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
         "--include-dashboard=true", f"--dashboard-port={dashboard}", "--disable-usage-stats",
         # free ports, not the defaults another cluster on this machine may hold
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--temp-dir={tempfile.mkdtemp(prefix='rc-job-', dir='/tmp')}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([ray_cli, "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head failed"
            time.sleep(2)
        while True:  # the job agent starts a little after the dashboard answers
            submitted = subprocess.run(
                [ray_cli, "job", "submit", "--address", address, "--working-dir", str(repo), "--",
                 "python", "jobs/label.py", "--pairs", str(data["pairs_train"]), "--out", str(out)],
                env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in submitted.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert '"labelled": 200' in submitted.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only the head this test started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    labelled = read_pairs(out)
    assert len(labelled) == 200 and labelled["pair_id"].is_unique and labelled["error"].isna().all()
