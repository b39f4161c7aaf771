"""Start a real ``ray start --head`` cluster on free ports for job-submission tests; stop only it.

``ray stop`` would kill every Ray on the machine (including the test session's own), so the head runs
as ``ray start --block`` in its own process group and is stopped by signalling that group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from raycache.io import free_port

BIN = Path(sys.executable).parent


def job_env() -> dict[str, str]:
    """Environment for the ``ray`` CLI: token auth on when a local token exists (Ray 2.60 enables it)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if (Path.home() / ".ray" / "auth_token").exists() or os.environ.get("RAY_AUTH_TOKEN"):
        env["RAY_AUTH_MODE"] = "token"
    return env


@contextmanager
def ray_head(num_cpus: int = 2, temp_dir: str | None = None, timeout_s: float = 120):
    """Yield the dashboard URL of a fresh head node; kill its process group on exit."""
    temp_dir = temp_dir or os.environ.get("RAY_TMPDIR", "/tmp")
    dashboard = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", f"--num-cpus={num_cpus}",
           f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
           f"--ray-client-server-port={free_port()}", "--dashboard-host=127.0.0.1",
           "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    log = open(Path(temp_dir) / f"ray-head-{dashboard}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=job_env(), start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/api/version", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"Ray head did not come up in {timeout_s}s; see {log.name}")
            time.sleep(1)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        log.close()


def submit(url: str, script_args: list[str], cwd: str | Path, timeout_s: float = 600,
           attempts: int = 10) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir . -- python ...``; retries while the job agent is starting."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--", "python",
           *script_args]
    for attempt in range(attempts):
        proc = subprocess.run(cmd, cwd=cwd, env=job_env(), capture_output=True, text=True, timeout=timeout_s)
        if "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(3)
    return proc
