"""Jobs on real Ray clusters: `ray job submit` against `ray start --head`, and a multi-node cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from raycache.data import read_pairs, write_table

from .ray_head import ray_head, submit

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def _small_data(tmp: Path) -> tuple[Path, Path]:
    from raycache import workload

    prompts = workload.generate_prompts(seed=3)
    test = prompts[prompts["split"] == "test"]
    pairs = workload.generate_pairs(test, n_pairs=60, seed=3)
    stream = workload.generate_stream(test, n_arrivals=120, seed=3)
    write_table(pairs, tmp / "pairs.jsonl")
    write_table(stream, tmp / "stream.jsonl")
    return tmp / "pairs.jsonl", tmp / "stream.jsonl"


def test_ray_job_submit_label_and_simulate(tmp_path):
    pairs, stream = _small_data(tmp_path)
    with ray_head(num_cpus=2) as url:
        proc = submit(url, ["jobs/label.py", "--pairs", str(pairs), "--out", str(tmp_path / "labels")], cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout + proc.stderr
        proc = submit(url, ["jobs/simulate.py", "--stream", str(stream), "--out", str(tmp_path / "sim"),
                            "--threshold", "0.9"], cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    labelled = read_pairs(tmp_path / "labels")
    source = pd.read_json(pairs, lines=True)
    assert len(labelled) == len(source)
    assert (labelled["label"] == (labelled["group_a"] == labelled["group_b"]).astype(float)).all()
    report = json.loads((tmp_path / "sim" / "simulation.json").read_text())
    assert report["arrivals"] == 120


MULTINODE = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from raycache.config import LabelConfig, SimulateConfig
    from raycache.labeling import job as label_job
    from raycache import simulation

    pairs, stream, out = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no work
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        label = label_job.run(LabelConfig(pairs=pairs, out=out + "/labels"))
        sim = simulation.run(SimulateConfig(stream=stream, out=out + "/sim", threshold=0.9))
        nodes = [n for n in ray.nodes() if n["Alive"]]
        print(json.dumps({"nodes": len(nodes), "labelled": label["labelled"], "arrivals": sim["arrivals"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_label_and_simulate_on_a_multinode_cluster(tmp_path):
    pairs, stream = _small_data(tmp_path)
    script = tmp_path / "multinode.py"
    script.write_text(MULTINODE)
    proc = subprocess.run([sys.executable, str(script), str(pairs), str(stream), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"nodes": 3, "labelled": 60, "arrivals": 120}
