"""`bash scripts/pipeline.sh --teacher openai --teacher-model M --endpoint URL` against an in-test
OpenAI-compatible server: the pipeline's label stage asks that server, with that model name."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.test_labeling_backends import FakeChatServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray
def test_pipeline_sh_with_an_openai_compatible_teacher(tmp_path):
    server = FakeChatServer()
    try:
        cfg = tmp_path / "tiny.yaml"
        cfg.write_text("pipeline:\n  generate: {n_train_pairs: 20, n_test_pairs: 20, n_arrivals: 20,"
                       " n_val_pairs: 20, n_val_arrivals: 20}\n  k: 1\n  random_per_prompt: 0.0\n")
        env = {**os.environ, "RAYCACHE_SKIP_SETUP": "1", "JUDGE_KEY": "sk-pipeline"}
        proc = subprocess.run(
            ["bash", "scripts/pipeline.sh", "--config", str(cfg), "--out", str(tmp_path / "run"),
             "--teacher", "openai", "--teacher-model", "judge-7b", "--endpoint", server.url,
             "--api-key-env", "JUDGE_KEY", "--concurrency", "8", "--to", "label"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert server.requests, "the teacher endpoint was never called"
        assert {r["body"]["model"] for r in server.requests} == {"judge-7b"}
        assert {r["headers"]["Authorization"] for r in server.requests} == {"Bearer sk-pipeline"}
        from raycache.data import read_pairs

        labels = read_pairs(tmp_path / "run" / "labels")
        assert len(labels) == len(server.seen) and set(labels["teacher"]) == {"openai:judge-7b"}
        assert "label" in proc.stdout + proc.stderr  # the stage's progress line
    finally:
        server.close()
