"""Benchmark: offline replay of a 1,000,000-arrival stream with precomputed embeddings.

Builds a Zipf stream over the embedded workload's prompts, embeds each distinct prompt once with the
default encoder, writes the stream-order embeddings as a float32 .npy (1.5 GB for 1M x 384) chunk by
chunk, then runs ``raycache.simulation.run`` on it (the .npy memory-mapped) and prints arrivals/s
and the process's peak memory. Nothing here is a CI test.

    python bench/simulate_scale.py --arrivals 1000000 --out /tmp/sim-scale
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_now_gb() -> dict:
    """Resident memory now (GiB), split into anonymous (heap) and file-backed (the memory-mapped
    .npy pages, which the kernel can drop) from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 2**20, 2)
    return fields


def build_inputs(out: Path, arrivals: int, seed: int) -> tuple[Path, Path]:
    """Write stream.parquet and embeddings.npy (stream order) under ``out``; reuse if present."""
    from raycache.data import write_table
    from raycache.encoder import Encoder
    from raycache.workload import generate_prompts, generate_stream

    stream_path, emb_path = out / "stream.parquet", out / "embeddings.npy"
    if stream_path.exists() and emb_path.exists():
        return stream_path, emb_path
    started = time.perf_counter()
    prompts = generate_prompts(seed=seed)
    stream = generate_stream(prompts[prompts["split"] == "test"], arrivals, seed=seed)
    write_table(stream, stream_path)
    distinct, inverse = np.unique(stream["prompt"].to_numpy(dtype=object), return_inverse=True)
    print(f"stream: {arrivals} arrivals, {len(distinct)} distinct prompts "
          f"({time.perf_counter() - started:.1f}s)", flush=True)
    started = time.perf_counter()
    vectors = Encoder.load(device="cpu").encode(list(distinct), batch_size=64)
    print(f"embedded {len(distinct)} distinct prompts in {time.perf_counter() - started:.1f}s", flush=True)
    matrix = np.lib.format.open_memmap(emb_path, mode="w+", dtype=np.float32,
                                       shape=(arrivals, vectors.shape[1]))
    for start in range(0, arrivals, 65536):
        matrix[start:start + 65536] = vectors[inverse[start:start + 65536]]
    matrix.flush()
    del matrix
    return stream_path, emb_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrivals", type=int, default=1_000_000)
    parser.add_argument("--out", default="/tmp/raycache-sim-scale")
    parser.add_argument("--threshold", type=float, action="append",
                        help="threshold(s) to replay (repeat the flag); default 0.86")
    parser.add_argument("--no-exact-tier", action="store_true",
                        help="disable the exact tier, so every arrival is a vector search")
    parser.add_argument("--replay", choices=["auto", "vectorized", "engine"], default="auto",
                        help="'engine' replays one arrival at a time through SemanticCache")
    parser.add_argument("--capacity", type=int, default=None, help="cache capacity (LRU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from raycache import simulation
    from raycache.config import CacheConfig, SimulateConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stream_path, emb_path = build_inputs(out, args.arrivals, args.seed)
    rss_before = peak_rss_gb()
    thresholds = args.threshold or [0.86]
    cfg = SimulateConfig(stream=str(stream_path), out=str(out / "report"), embeddings=str(emb_path),
                         thresholds=thresholds, replay=args.replay,
                         cache=CacheConfig(capacity=args.capacity, exact_tier=not args.no_exact_tier))
    started = time.perf_counter()
    summary = simulation.run(cfg)
    total_s = time.perf_counter() - started
    entry = summary["models"]["base"]
    result = {
        "arrivals": summary["arrivals"], "thresholds": thresholds,
        "exact_tier": not args.no_exact_tier, "replay": args.replay, "capacity": args.capacity,
        "embeddings_gb": round(emb_path.stat().st_size / 2**30, 2),
        "replay_seconds": entry["replay_seconds"], "arrivals_per_s": entry["arrivals_per_s"],
        "job_seconds_incl_reading_stream": round(total_s, 1),
        "peak_rss_gb_before_job": round(rss_before, 2), "peak_rss_gb": round(peak_rss_gb(), 2),
        "rss_after_job_gb": memory_now_gb(),
        "headline": entry["headline"], "oracle_hit_rate": summary["oracle_hit_rate"],
    }
    print(json.dumps(result, indent=2))
    (out / "bench_result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
