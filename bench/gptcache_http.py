"""Benchmark 3b: raycache's HTTP service (`raycache serve`) vs GPTCache's HTTP server (`gptcache_server`).

Both servers run as their READMEs start them, each in its own process tree, on this machine:

* raycache: ``raycache serve --host 127.0.0.1 --port P`` (Ray Serve: proxy, FastAPI ingress, the
  CacheEngine replica, 1-2 autoscaled embedder replicas; defaults: the embedded all-MiniLM-L6-v2,
  static cosine threshold 0.9, exact tier on, flat index, capacity 100,000). Routes
  ``POST /v1/cache/lookup`` {"prompt"} and ``POST /v1/cache/store`` {"prompt", "response"};
  ``DELETE /v1/cache`` empties it between concurrency levels.
* GPTCache 0.1.44 (PyPI, its own virtualenv, see ``bench.service.ensure_gptcache_venv``):
  ``gptcache_server -s 127.0.0.1 -p P -f gptcache.yaml``, the YAML of its documented server
  configuration: ``embedding: sbert`` with ``embedding_config: {model: <the same local
  all-MiniLM-L6-v2 folder>}`` (SBERT takes a folder path), ``storage_config: {manager:
  sqlite,faiss, eviction_params: {max_size: 100000}}`` (its default max_size, 1,000, would evict
  within a run; 100,000 is raycache's capacity), ``evaluation: distance``, ``pre_function:
  get_prompt``, ``config: {similarity_threshold: 0.8}`` (its default; = cosine >= 0.6 for unit
  vectors). Routes ``POST /get`` {"prompt"} -> {"answer": null on a miss} and ``POST /put``
  {"prompt", "answer"}. It has no route that empties the cache, so every concurrency level gets a
  fresh server and data folder (start-up is not timed). It runs with ``--threads`` torch threads
  (OMP/MKL_NUM_THREADS; default 1, as Ray gives each raycache embedder replica).

Load: the QQP dev stream (``../shared/data/streams/stream_qqp_dev.jsonl`` via
``raycache.data.read_stream``; every arrival of a random subset of its groups, ``--arrivals`` in
all, in stream order), replayed cache-aside by ``concurrency`` asyncio workers sharing one httpx
client per server: look up; on a miss store the arrival's prompt with a response naming its group.
A hit is correct iff the served response names the arrival's group. The two servers replay the same
blocks of arrivals (``max(--block, 8 x concurrency)`` each), alternating which goes first, so outside
load hits both alike; "vs GPTCache" is the median over blocks of GPTCache's seconds / raycache's.
arrivals/s = arrivals / seconds spent replaying; an arrival is one lookup plus, on a miss, one store.
Any reply that is not 2xx ends the run with its error, so a table that prints had no 5xx. "vs 1st level"
is raycache's arrivals/s over its own at the lowest concurrency of the run (``--no-gptcache --shards 2
--concurrency 1,16``: the 16-client scaling of a two-shard service).

    python -m bench.gptcache_http --arrivals 2000 --concurrency 1,8,32
    python -m bench.gptcache_http --arrivals 200 --concurrency 1,8      # smoke run
    python -m bench.gptcache_http --no-gptcache --shards 2 --concurrency 1,16   # scaling with clients
    python -m bench.gptcache_http --embedder engine    # raycache embedding in its engine replica
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from bench.common import (latency_ms, markdown_table, median_ratio, setup_env, shared_data_dir,
                          write_results)
from bench.service import Tally, ensure_gptcache_venv, oracle_hit_rate, sample_groups

# what gptcache_server imports beyond GPTCache's install requirements: (check, requirement); the
# openai pin is GPTCache's own (gptcache.utils.import_openai), its adapter needs the pre-1.0 API
GPTCACHE_SERVER_EXTRA = [("import ruamel.yaml", "ruamel.yaml"), ("import uvicorn", "uvicorn"),
                         ("import fastapi", "fastapi"),
                         ("import openai; assert openai.version.VERSION.startswith('0.')", "openai==0.28.1")]
GPTCACHE_MAX_SIZE = 100_000  # entries before GPTCache evicts (= raycache's default capacity)
START_TIMEOUT_S = 600.0  # a server that answers nothing by then failed to start
REQUEST_TIMEOUT_S = 120.0
GPTCACHE = "GPTCache (gptcache_server)"
RAYCACHE = "raycache (raycache serve)"


# ----------------------------------------------------------------------------- arguments
def concurrency_levels(text: str) -> list[int]:
    """``"1,8,32"`` -> [1, 8, 32]; ArgumentTypeError naming the bad part."""
    levels = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(
                f"--concurrency: {part!r} is not a positive integer (expected e.g. 1,8,32)")
        levels.append(int(part))
    return levels


def load_arrivals(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """About ``n`` QQP dev arrivals as (prompt, response naming its group); see ``sample_groups``."""
    from raycache.data import read_stream

    frame = read_stream(shared_data_dir() / "streams" / "stream_qqp_dev.jsonl")
    return sample_groups(frame["prompt"].tolist(), frame["group"].astype(str).tolist(), n, seed)


# ----------------------------------------------------------------------------- servers
class Server:
    """A server process (its own session), its output in ``log``; :meth:`stop` ends it and what it
    started."""

    def __init__(self, name: str, argv: list[str], url: str, ready_path: str, log: Path,
                 env: Optional[dict] = None):
        self.name, self.argv, self.url, self.ready_path, self.log = name, argv, url, ready_path, log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Seconds until ``GET ready_path`` answers 200; RuntimeError if the process exits first."""
        import httpx

        started = time.perf_counter()
        while time.perf_counter() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before answering; "
                                   f"its output ({self.log}) ends:\n{self.tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer {self.url}{self.ready_path} within {timeout_s:.0f} s; "
                           f"its output ({self.log}) ends:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM to the server (raycache serve saves and shuts Serve down on it), then SIGKILL to
        whatever is left of its process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=30)
        self._log.close()


def gptcache_config(model_dir: str, data_dir: str, similarity_threshold: float = 0.8,
                    max_size: int = GPTCACHE_MAX_SIZE) -> dict:
    """The ``gptcache_server -f`` YAML (as a dict) of GPTCache's documented server configuration:
    SBERT on ``model_dir``, SQLite + FAISS in ``data_dir``, distance evaluation."""
    return {"embedding": "sbert", "embedding_config": {"model": model_dir},
            "storage_config": {"manager": "sqlite,faiss", "data_dir": data_dir,
                               "eviction_params": {"max_size": max_size}},
            "evaluation": "distance", "pre_function": "get_prompt", "post_function": "first",
            "config": {"similarity_threshold": similarity_threshold}}


def cosine_of_similarity_threshold(similarity_threshold: float, max_distance: float = 4.0) -> float:
    """The cosine GPTCache's distance evaluation hits at: its score is ``max_distance`` - squared L2
    = 2 + 2 cos for unit vectors, a hit when score >= max_distance x threshold."""
    return (max_distance * similarity_threshold - 2.0) / 2.0


def start_gptcache(python: Path, model_dir: str, work: Path, tag: str, threads: int,
                   similarity_threshold: float) -> Server:
    import yaml

    from raycache.io import free_port

    data_dir = work / f"gptcache-{tag}"
    config = work / f"gptcache-{tag}.yaml"
    config.write_text(yaml.safe_dump(gptcache_config(model_dir, str(data_dir), similarity_threshold)))
    port = free_port()
    env = dict(os.environ, PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    argv = [str(python.parent / "gptcache_server"), "-s", "127.0.0.1", "-p", str(port), "-f", str(config)]
    return Server(GPTCACHE, argv, f"http://127.0.0.1:{port}", "/", work / f"gptcache-{tag}.log", env)


def raycache_argv(port: int, threshold: Optional[float], shards: int = 1,
                  embedder: str = "deployment", extra: Sequence[str] = ()) -> list[str]:
    """``raycache serve`` on 127.0.0.1:``port`` with its defaults, but ``--threshold``/``--shards``/
    ``--embedder`` and the ``extra`` flags."""
    script = Path(sys.executable).with_name("raycache")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "raycache.cli"]
    argv += ["serve", "--host", "127.0.0.1", "--port", str(port)]
    if threshold is not None:
        argv += ["--threshold", str(threshold)]
    if shards > 1:
        argv += ["--shards", str(shards)]
    if embedder != "deployment":
        argv += ["--embedder", embedder]
    return argv + list(extra)


def start_raycache(work: Path, threshold: Optional[float], shards: int = 1,
                   embedder: str = "deployment", extra: Sequence[str] = ()) -> Server:
    from raycache.io import free_port

    port = free_port()
    argv = raycache_argv(port, threshold, shards, embedder, extra)
    return Server(RAYCACHE, argv, f"http://127.0.0.1:{port}", "/healthz", work / "raycache.log")


# ----------------------------------------------------------------------------- HTTP clients
class CacheClient(Protocol):
    """One server's cache-aside routes over an ``httpx.AsyncClient``."""

    async def lookup(self, prompt: str) -> Optional[str]: ...  # the cached response, None on a miss

    async def store(self, prompt: str, response: str) -> None: ...


class _JsonClient:
    def __init__(self, client: Any):
        self.client = client

    async def _send(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        reply = await self.client.request(method, path, json=body)
        reply.raise_for_status()
        return reply.json()


class RaycacheClient(_JsonClient):
    async def lookup(self, prompt: str) -> Optional[str]:
        body = await self._send("POST", "/v1/cache/lookup", {"prompt": prompt})
        return body["response"] if body["hit"] else None

    async def store(self, prompt: str, response: str) -> None:
        await self._send("POST", "/v1/cache/store", {"prompt": prompt, "response": response})

    async def clear(self) -> int:
        return (await self._send("DELETE", "/v1/cache"))["removed"]


class GPTCacheClient(_JsonClient):
    async def lookup(self, prompt: str) -> Optional[str]:
        return (await self._send("POST", "/get", {"prompt": prompt})).get("answer")

    async def store(self, prompt: str, response: str) -> None:
        await self._send("POST", "/put", {"prompt": prompt, "answer": response})


# ----------------------------------------------------------------------------- replay
class Run:
    """One contender at one concurrency: :class:`bench.service.Tally` plus whole-arrival latencies,
    stores and seconds per block."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.arrival_s: list[float] = []
        self.block_s: list[float] = []
        self.stores = 0

    def summary(self) -> dict:
        out = self.tally.summary(1)
        out.update(arrival=latency_ms(self.arrival_s), stores=self.stores,
                   http_requests_per_s=(self.tally.arrivals + self.stores) / self.tally.busy_s
                   if self.tally.busy_s else None)
        return out


async def replay_block(cache: CacheClient, block: Sequence[tuple[str, str]], concurrency: int, run: Run) -> None:
    """Replay ``block`` cache-aside with ``concurrency`` workers taking the next arrival in turn."""
    pending = iter(enumerate(block))  # shared: each worker takes the next arrival when free
    served: list[Optional[str]] = [None] * len(block)

    async def worker() -> None:
        for i, (prompt, response) in pending:
            start = time.perf_counter()
            answer = await cache.lookup(prompt)
            looked = time.perf_counter()
            if answer is None:
                await cache.store(prompt, response)
                run.stores += 1
            run.tally.lookup_s.append(looked - start)
            run.arrival_s.append(time.perf_counter() - start)
            served[i] = answer

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(block)))))
    seconds = time.perf_counter() - start
    run.block_s.append(seconds)
    run.tally.busy_s += seconds
    run.tally.record(served, [response for _, response in block])


async def replay_level(caches: dict[str, CacheClient], stream: Sequence[tuple[str, str]], concurrency: int,
                       block: int) -> dict[str, Run]:
    """Every contender replays ``stream`` block by block, alternating which goes first."""
    runs = {name: Run() for name in caches}
    names = list(caches)
    for i, lo in enumerate(range(0, len(stream), block)):
        part = stream[lo:lo + block]
        for name in (names if i % 2 == 0 else names[::-1]):
            await replay_block(caches[name], part, concurrency, runs[name])
    return runs


# ----------------------------------------------------------------------------- main
async def measure(stream: list[tuple[str, str]], levels: Sequence[int], block: int,
                  gptcache_python: Optional[Path],
                  model_dir: str, work: Path, threads: int, similarity_threshold: float,
                  raycache_threshold: Optional[float], shards: int = 1, with_gptcache: bool = True,
                  progress: bool = True, embedder: str = "deployment",
                  raycache_extra: Sequence[str] = ()) -> dict:
    """Replay ``stream`` at each concurrency in ``levels`` against raycache (and, with
    ``with_gptcache``, a fresh GPTCache server per level); ``{"levels": {c: ...}, "info": ...}``."""
    import httpx

    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    info: dict = {}
    results: dict = {}
    raycache = start_raycache(work, raycache_threshold, shards, embedder, raycache_extra)
    gptcache: Optional[Server] = None
    try:
        info["raycache_startup_s"] = raycache.wait_ready()
        info["raycache_command"] = " ".join(raycache.argv)
        async with httpx.AsyncClient(base_url=raycache.url, timeout=REQUEST_TIMEOUT_S, limits=limits) as rc_http:
            ray_client = RaycacheClient(rc_http)
            for c in levels:
                async with contextlib.AsyncExitStack() as stack:
                    caches: dict[str, CacheClient] = {}
                    if with_gptcache:
                        gptcache = start_gptcache(gptcache_python, model_dir, work, f"c{c}", threads,
                                                  similarity_threshold)
                        info.setdefault("gptcache_startup_s", []).append(gptcache.wait_ready())
                        info["gptcache_command"] = " ".join(gptcache.argv)
                        gc_http = await stack.enter_async_context(httpx.AsyncClient(
                            base_url=gptcache.url, timeout=REQUEST_TIMEOUT_S, limits=limits))
                        caches[GPTCACHE] = GPTCacheClient(gc_http)
                        await caches[GPTCACHE].lookup("warm-up prompt")
                    caches[RAYCACHE] = ray_client
                    # warm-up, untimed: model, routes, connections; then both caches are empty
                    await ray_client.lookup("warm-up prompt")
                    await ray_client.store("warm-up prompt", "-")
                    await ray_client.clear()
                    load_start = os.getloadavg()[0]
                    level_block = max(block, 8 * c)
                    started = time.perf_counter()
                    runs = await replay_level(caches, stream, c, level_block)
                    wall_s = time.perf_counter() - started
                    load_end = os.getloadavg()[0]
                await ray_client.clear()
                if gptcache is not None:
                    gptcache.stop()
                    gptcache = None
                results[str(c)] = {
                    "concurrency": c, "block": level_block, "wall_s": wall_s,
                    "load_avg_1m": [round(load_start, 2), round(load_end, 2)],
                    "raycache_vs_gptcache": (median_ratio(runs[GPTCACHE].block_s, runs[RAYCACHE].block_s)
                                             if GPTCACHE in runs else None),
                    "contenders": {name: run.summary() for name, run in runs.items()}}
                if progress:
                    print(f"  concurrency {c}: done in {wall_s:.0f} s (load {load_start:.1f} -> {load_end:.1f})",
                          flush=True)
    finally:
        if gptcache is not None:
            gptcache.stop()
        raycache.stop()
    return {"levels": results, "info": info}


def scaling(levels: dict, name: str = RAYCACHE) -> dict[str, float]:
    """``name``'s arrivals/s at each concurrency over its arrivals/s at the lowest one measured."""
    rates = {c: level["contenders"][name]["requests_per_s"] for c, level in levels.items()}
    lowest = min(levels, key=lambda c: levels[c]["concurrency"])
    return {c: rate / rates[lowest] for c, rate in rates.items()}


def table(levels: dict) -> str:
    rows = []
    scale = scaling(levels)
    for c, level in levels.items():
        for name, r in level["contenders"].items():
            if name == GPTCACHE:
                ratio, scaled = "1.00x", ""
            else:
                ratio = ("" if level["raycache_vs_gptcache"] is None
                         else f"{level['raycache_vs_gptcache']:.2f}x")
                scaled = f"{scale[c]:.2f}x"
            load = level["load_avg_1m"]
            rows.append([level["concurrency"], name, r["requests_per_s"], ratio, scaled,
                         r["http_requests_per_s"], r["lookup"]["p50_ms"], r["lookup"]["p99_ms"],
                         r["arrival"]["p50_ms"], r["arrival"]["p99_ms"], r["hit_rate"], r["false_hit_rate"],
                         r["correct_hit_rate"], f"{load[0]:.1f}-{load[1]:.1f}"])
    return markdown_table(["concurrency", "contender", "arrivals/s", "vs GPTCache", "vs 1st level", "HTTP req/s",
                           "lookup p50 ms", "lookup p99 ms", "arrival p50 ms", "arrival p99 ms", "hit rate",
                           "false-hit rate", "correct-hit rate", "load 1m"], rows)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arrivals", type=int, default=2000, help="about this many QQP arrivals (whole groups)")
    parser.add_argument("--concurrency", type=concurrency_levels, default=[1, 8, 32],
                        help="comma-separated numbers of concurrent clients, one run each")
    parser.add_argument("--block", type=int, default=64,
                        help="arrivals per turn (at least 8 x concurrency), the servers alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of gptcache_server's encoder")
    parser.add_argument("--gptcache-similarity", type=float, default=0.8,
                        help="GPTCache's similarity_threshold (its default 0.8 = cosine >= 0.6)")
    parser.add_argument("--raycache-threshold", type=float, default=None,
                        help="raycache serve --threshold (default: its own, cosine 0.9)")
    parser.add_argument("--shards", type=int, default=1, help="raycache serve --shards (engine replicas)")
    parser.add_argument("--embedder", choices=["deployment", "engine", "ingress"], default="deployment",
                        help="raycache serve --embedder: the Embedder deployment, in the engine replica, or cache and encoder in the Ingress replica")
    parser.add_argument("--raycache-flags", default="",
                        help="more raycache serve flags, one string (e.g. '--embedder-num-cpus 1')")
    parser.add_argument("--no-gptcache", action="store_true",
                        help="replay raycache alone (e.g. --shards 2 --concurrency 1,16: scaling with clients)")
    parser.add_argument("--seed", type=int, default=0, help="which groups of the stream are replayed")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.arrivals < 1 or args.block < 1 or args.threads < 1 or args.shards < 1:
        parser.error("--arrivals, --block, --threads and --shards must be positive")
    setup_env()
    from raycache.encoder import default_model_path

    gptcache_python = None if args.no_gptcache else ensure_gptcache_venv(extra=GPTCACHE_SERVER_EXTRA)
    stream = load_arrivals(args.arrivals, args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rcb-gptcache-http-") as work:
        out = asyncio.run(measure(stream, args.concurrency, args.block, gptcache_python, str(default_model_path()),
                                  Path(work), args.threads, args.gptcache_similarity, args.raycache_threshold,
                                  shards=args.shards, with_gptcache=not args.no_gptcache,
                                  embedder=args.embedder, raycache_extra=args.raycache_flags.split()))
    out.update(stream="qqp", arrivals=len(stream), oracle_hit_rate=oracle_hit_rate(stream),
               concurrency=args.concurrency, threads=args.threads, gptcache_similarity=args.gptcache_similarity,
               gptcache_cosine_equivalent=cosine_of_similarity_threshold(args.gptcache_similarity),
               raycache_threshold=args.raycache_threshold, shards=args.shards, embedder=args.embedder,
               raycache_scaling=scaling(out["levels"]), wall_s=time.perf_counter() - started)
    print(f"\nCache-aside HTTP replay of {len(stream)} QQP dev arrivals (oracle hit rate "
          f"{out['oracle_hit_rate']:.3f}); GPTCache similarity_threshold {args.gptcache_similarity} "
          f"(= cosine >= {out['gptcache_cosine_equivalent']:.2f}), raycache threshold "
          f"{args.raycache_threshold if args.raycache_threshold is not None else 'default (0.9)'}\n")
    print(table(out["levels"]))
    path = write_results("gptcache_http", out, args.out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
