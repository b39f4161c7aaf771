"""Benchmark 3: raycache (in-process engine and Ray Serve HTTP service) vs GPTCache, same stream.

Every contender replays the same arrivals cache-aside (look up; on a miss store the arrival's
response), with the same all-MiniLM-L6-v2 model, each at its own default decision rule:

* GPTCache 0.1.44 from PyPI, in its own virtualenv (created on first run, see
  ``ensure_gptcache_venv``) and its own process (``bench/gptcache_worker.py``): SBERT embedding,
  SQLite + FAISS data manager, ``SearchDistanceEvaluation``, default threshold 0.8 (= cosine >= 0.6).
  GPTCache has no server here; it is a library, so it is measured in-process (inside its worker;
  the pipe to it is not timed).
* raycache's ``SemanticCache`` in-process: one prompt per call, and batches of ``--batch`` prompts.
* raycache's Ray Serve HTTP service (``raycache.service.app.start``), one prompt per request and
  batched requests: what the network layer, Serve routing and the embedder replica add.

All contenders advance through the stream together, block by block, alternating their order, so
the other processes loading the machine hit them alike. Every encoder runs one torch thread
(``--threads``; Ray gives the Serve embedder replica one too), as in bench/encode_throughput.py. Hit correctness: the served response is the
arrival's group's response. Rates are per arrival.

    python -m bench.service                  # ~2,000 QQP arrivals, ~10 min
    python -m bench.service --quick
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.common import REPO, latency_ms, markdown_table, read_jsonl, setup_env, shared_data_dir, write_results

GPTCACHE_REQUIREMENTS = ["gptcache==0.1.44", "sqlalchemy>=2"]
GPTCACHE_VENV = Path(os.environ.get("RAYCACHE_GPTCACHE_VENV", "/tmp/gptcache-venv"))


# ----------------------------------------------------------------------------- the stream
def load_stream(name: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """About ``n`` arrivals as (prompt, response); the response names the group, so a hit is correct
    iff it returns the arrival's own group's response.

    qqp: every arrival of a random subset of groups, in stream order (the file's first ``n``
    arrivals would hold few repeats: its 19k arrivals spread 15k groups over the whole file).
    """
    if name == "qqp":
        rows = read_jsonl(shared_data_dir() / "streams" / "stream_qqp_dev.jsonl")
        return sample_groups([r["prompt"] for r in rows], [r["group"] for r in rows], n, seed)
    if name == "workload":
        from raycache.workload import generate_prompts, generate_stream

        prompts = generate_prompts(seed)
        stream = generate_stream(prompts[prompts["split"] == "test"], n, seed)
        return [(p, f"answer of group {g}") for p, g in zip(stream["prompt"], stream["group"])]
    raise SystemExit(f"unknown stream {name!r}; expected 'qqp' or 'workload'")


def sample_groups(prompts: Sequence[str], groups: Sequence[str], n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Every arrival of a random subset of groups, about ``n`` arrivals (whole groups, so a little
    more), in stream order, as (prompt, response naming the group)."""
    size: dict[str, int] = {}
    for g in groups:
        size[g] = size.get(g, 0) + 1
    names = sorted(size)
    chosen, total = set(), 0
    for i in np.random.default_rng(seed).permutation(len(names)):
        if total >= n:
            break
        chosen.add(names[i])
        total += size[names[i]]
    return [(p, f"answer of group {g}") for p, g in zip(prompts, groups) if g in chosen]


def oracle_hit_rate(stream: list[tuple[str, str]]) -> float:
    """Share of arrivals whose group arrived before: the hit rate of a perfect cache."""
    seen: set[str] = set()
    repeats = 0
    for _, response in stream:
        repeats += response in seen
        seen.add(response)
    return repeats / len(stream) if stream else 0.0


# ----------------------------------------------------------------------------- contenders
class Tally:
    """Per-contender counters: busy seconds, lookup-call latencies, hits, wrong hits."""

    def __init__(self) -> None:
        self.busy_s = 0.0
        self.lookup_s: list[float] = []
        self.arrivals = self.hits = self.wrong_hits = 0

    def record(self, served: list, expected: list[str]) -> None:
        self.arrivals += len(expected)
        for answer, truth in zip(served, expected):
            if answer is not None:
                self.hits += 1
                self.wrong_hits += answer != truth

    def summary(self, prompts_per_call: int) -> dict:
        return {"arrivals": self.arrivals, "requests_per_s": self.arrivals / self.busy_s if self.busy_s else None,
                "prompts_per_lookup_call": prompts_per_call, "lookup": latency_ms(self.lookup_s),
                "hit_rate": self.hits / self.arrivals, "false_hit_rate": self.wrong_hits / self.arrivals,
                "correct_hit_rate": (self.hits - self.wrong_hits) / self.arrivals}


class GPTCacheContender:
    """GPTCache in its worker process; times are the worker's own measurements of get/put."""

    batch = 1

    def __init__(self, python: Path, model_dir: str, data_dir: str, threads: int):
        env = dict(os.environ, PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([str(python), str(REPO / "bench" / "gptcache_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._call({"op": "init", "model": model_dir, "dir": data_dir})
        self.tally = Tally()

    def _call(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"GPTCache worker exited (code {self.proc.poll()}); see its stderr above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"GPTCache worker: {reply['error']}")
        return reply

    def warm_up(self) -> None:
        self._call({"op": "get", "prompt": "warm-up prompt"})

    def replay(self, block: list[tuple[str, str]]) -> None:
        served = []
        for prompt, response in block:
            got = self._call({"op": "get", "prompt": prompt})
            self.tally.lookup_s.append(got["s"])
            self.tally.busy_s += got["s"]
            if got["answer"] is None:
                self.tally.busy_s += self._call({"op": "put", "prompt": prompt, "answer": response})["s"]
            served.append(got["answer"])
        self.tally.record(served, [r for _, r in block])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._call({"op": "quit"})
            except (BrokenPipeError, RuntimeError):
                pass
        self.proc.wait(timeout=30)


class EngineContender:
    """raycache's SemanticCache in this process, ``batch`` prompts per check_batch call."""

    def __init__(self, encoder, batch: int):
        from raycache.cache.engine import SemanticCache
        from raycache.config import CacheConfig

        self.batch = batch
        self.cache = SemanticCache.from_config(CacheConfig(capacity=None), encoder=encoder)
        self.encoder = encoder
        self.tally = Tally()

    def warm_up(self) -> None:
        self.encoder.encode(["warm-up prompt"])

    def replay(self, block: list[tuple[str, str]]) -> None:
        served = []
        for lo in range(0, len(block), self.batch):
            part = block[lo:lo + self.batch]
            start = time.perf_counter()
            results = self.cache.check_batch([p for p, _ in part])
            looked = time.perf_counter()
            misses = [(p, r) for (p, r), res in zip(part, results) if not res.hit]
            if misses:
                self.cache.store_batch([p for p, _ in misses], [r for _, r in misses])
            self.tally.lookup_s.append(looked - start)
            self.tally.busy_s += time.perf_counter() - start
            served += [res.response if res.hit else None for res in results]
        self.tally.record(served, [r for _, r in block])


class HttpContender:
    """raycache's HTTP service: ``batch`` == 1 sends {"prompt"}, else {"prompts": [...]} and
    stores a batch's misses with one batch store ({"prompts", "responses"})."""

    def __init__(self, client, batch: int, namespace: str):
        self.client, self.batch, self.namespace = client, batch, namespace
        self.tally = Tally()

    def _post(self, path: str, body: dict) -> dict:
        reply = self.client.post(path, json=body)
        reply.raise_for_status()
        return reply.json()

    def warm_up(self) -> None:
        self._post("/v1/cache/store", {"prompt": "warm-up prompt", "response": "-", "namespace": "warm-up"})
        self._post("/v1/cache/lookup", {"prompt": "warm-up prompt two", "namespace": "warm-up"})

    def replay(self, block: list[tuple[str, str]]) -> None:
        served = []
        for lo in range(0, len(block), self.batch):
            part = block[lo:lo + self.batch]
            start = time.perf_counter()
            if self.batch == 1:
                results = [self._post("/v1/cache/lookup", {"prompt": part[0][0], "namespace": self.namespace})]
            else:
                results = self._post("/v1/cache/lookup", {"prompts": [p for p, _ in part],
                                                          "namespace": self.namespace})["results"]
            looked = time.perf_counter()
            misses = [(prompt, response) for (prompt, response), res in zip(part, results) if not res["hit"]]
            if self.batch > 1 and misses:  # the batch form of /v1/cache/store: one request
                self._post("/v1/cache/store", {"prompts": [p for p, _ in misses],
                                               "responses": [r for _, r in misses],
                                               "namespace": self.namespace})
            else:
                for prompt, response in misses:
                    self._post("/v1/cache/store", {"prompt": prompt, "response": response,
                                                   "namespace": self.namespace})
            self.tally.lookup_s.append(looked - start)
            self.tally.busy_s += time.perf_counter() - start
            served += [res["response"] if res["hit"] else None for res in results]
        self.tally.record(served, [r for _, r in block])


# ----------------------------------------------------------------------------- GPTCache's venv
def ensure_gptcache_venv(venv: Path = GPTCACHE_VENV, extra: Sequence[tuple[str, str]] = ()) -> Path:
    """A virtualenv holding GPTCache and its own pins (plus ``extra``: (Python statement that fails
    without it, requirement) pairs, e.g. what ``gptcache_server`` imports); returns its python.

    The heavy shared libraries (torch, sentence-transformers, faiss) are not installed twice: a
    ``.pth`` file appends this environment's site-packages *after* the venv's own, so anything
    GPTCache pins wins and only what it lacks is borrowed. GPTCache installs missing optional
    packages itself with a bare ``pip``; its venv's ``bin`` goes first on PATH when it runs.
    """
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating GPTCache virtualenv at {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    checks = "; ".join(["import gptcache, sqlalchemy", *(check for check, _ in extra)])
    probe = subprocess.run([str(python), "-c", checks], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *GPTCACHE_REQUIREMENTS,
                        *(requirement for _, requirement in extra)], check=True)
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "zz_raycache_shared.pth").write_text(site.getsitepackages()[0] + "\n")
    return python


# ----------------------------------------------------------------------------- Ray Serve
def start_service(port: int | None = None) -> str:
    """raycache's Serve app on a local 2-CPU Ray (one embedder replica); returns its base URL."""
    import ray

    from raycache.config import CacheConfig, ServeConfig
    from raycache.service.app import start

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.environ["RAY_TMPDIR"])
    cfg = ServeConfig(cache=CacheConfig(capacity=None), port=port or 0, embedder_min_replicas=1,
                      embedder_max_replicas=1, blocking=False)
    return start(cfg)


def stop_service() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- main
def run(stream: list[tuple[str, str]], block: int, batch: int, http: bool, gptcache_python: Path | None,
        threads: int = 1, progress: bool = True) -> dict:
    """Replay ``stream`` through every contender in lockstep blocks; returns per-contender summaries."""
    import httpx
    import torch

    from raycache.encoder import Encoder, default_model_path

    torch.set_num_threads(threads)
    encoder = Encoder.load(device="cpu")
    contenders: dict = {}
    info: dict = {}
    tmp = tempfile.TemporaryDirectory(prefix="rcb-gptcache-")
    client = None
    try:
        if gptcache_python is not None:
            contenders["GPTCache, in-process"] = GPTCacheContender(gptcache_python, str(default_model_path()),
                                                                   tmp.name, threads)
            info["gptcache"] = contenders["GPTCache, in-process"].info
        contenders["raycache engine, in-process"] = EngineContender(encoder, 1)
        contenders[f"raycache engine, in-process, batch {batch}"] = EngineContender(encoder, batch)
        if http:
            started = time.perf_counter()
            url = start_service()
            info["serve_startup_s"] = time.perf_counter() - started
            client = httpx.Client(base_url=url, timeout=120)
            contenders["raycache HTTP (Ray Serve)"] = HttpContender(client, 1, "single")
            contenders[f"raycache HTTP (Ray Serve), batch {batch}"] = HttpContender(client, batch, "batched")
        for c in contenders.values():
            c.warm_up()
        names = list(contenders)
        for i, lo in enumerate(range(0, len(stream), block)):
            part = stream[lo:lo + block]
            for name in (names if i % 2 == 0 else names[::-1]):
                contenders[name].replay(part)
            if progress and (lo // block) % 10 == 9:
                print(f"  {lo + len(part)}/{len(stream)} arrivals", flush=True)
        results = {name: c.tally.summary(c.batch) for name, c in contenders.items()}
    finally:
        if client is not None:
            client.close()
        for c in contenders.values():
            if isinstance(c, GPTCacheContender):
                c.close()
        if http:
            stop_service()
        tmp.cleanup()
    return {"contenders": results, "info": info}


def table(results: dict, baseline: str = "GPTCache, in-process") -> str:
    rows = []
    base = results.get(baseline, {}).get("requests_per_s")
    for name, r in results.items():
        ratio = f"{r['requests_per_s'] / base:.2f}x" if base else "-"
        rows.append([name, r["prompts_per_lookup_call"], r["requests_per_s"], ratio, r["lookup"]["p50_ms"],
                     r["lookup"]["p99_ms"], r["hit_rate"], r["false_hit_rate"], r["correct_hit_rate"]])
    return markdown_table(["contender", "prompts/call", "arrivals/s", "vs GPTCache", "lookup p50 ms",
                           "lookup p99 ms", "hit rate", "false-hit rate", "correct-hit rate"], rows)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="qqp", choices=["qqp", "workload"])
    parser.add_argument("--arrivals", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32, help="prompts per batched lookup")
    parser.add_argument("--block", type=int, default=64, help="arrivals each contender replays per turn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process encoders")
    parser.add_argument("--no-http", action="store_true", help="skip the Ray Serve service")
    parser.add_argument("--no-gptcache", action="store_true", help="skip GPTCache (no virtualenv needed)")
    parser.add_argument("--quick", action="store_true", help="toy size: proves the code path, measures nothing")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.arrivals, args.batch, args.block = 24, 8, 8
    setup_env()
    gptcache_python = None if args.no_gptcache else ensure_gptcache_venv()
    stream = load_stream(args.stream, args.arrivals)
    started = time.perf_counter()
    out = run(stream, args.block, args.batch, http=not args.no_http, gptcache_python=gptcache_python,
              threads=args.threads)
    out.update(stream=args.stream, arrivals=len(stream), oracle_hit_rate=oracle_hit_rate(stream),
               batch=args.batch, block=args.block, threads=args.threads,
               wall_s=time.perf_counter() - started)
    print(f"\nCache-aside replay of {len(stream)} {args.stream} arrivals (oracle hit rate "
          f"{out['oracle_hit_rate']:.3f}; contenders alternate per block of {args.block}; each at its default "
          f"decision rule)\n")
    print(table(out["contenders"]))
    if "gptcache" in out["info"]:
        g = out["info"]["gptcache"]
        print(f"\nGPTCache {g['gptcache_version']}: {g['evaluation']}, similarity_threshold "
              f"{g['similarity_threshold']} (= cosine >= {g['cosine_threshold_equivalent']:.2f}); "
              f"raycache: static cosine threshold 0.9 (CacheConfig default)")
    path = write_results("service", out, args.out, quick=args.quick)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
