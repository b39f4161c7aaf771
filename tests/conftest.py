"""Shared fixtures: offline Hugging Face, a short RAY_TMPDIR, one local Ray per session (torn down)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Unix socket paths must stay short: keep Ray's session dir under /tmp.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rc-ray-", dir="/tmp"))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance (2 CPUs) shared by the session's Ray tests; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.environ["RAY_TMPDIR"])
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def encoder():
    """The embedded default encoder (all-MiniLM-L6-v2), loaded once per session."""
    from raycache.encoder import Encoder

    return Encoder.load(device="cpu")


@pytest.fixture()
def tmp(tmp_path: Path) -> Path:
    return tmp_path
