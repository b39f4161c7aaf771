"""The cache engine at scale, old against new in one run: bytes per entry, store throughput,
single-query latency, store latency at capacity (each store evicts one entry), snapshot, save and
restore times.

Each engine runs in its own fresh Python process (so its memory is measured alone): "new" is this
checkout's ``raycache``; "old" is the ``raycache`` package of git revision ``--old-rev`` (default:
the last commit before the columnar engine), extracted with ``git archive`` into a temporary folder
(the working tree and the repository are not touched).

    python -m bench.engine_scale --entries 10000                 # a quick check
    python -m bench.engine_scale --entries 100000 --entries 1000000   # the issue's sizes (alone on the machine)

Vectors: ``--dim`` (384, all-MiniLM-L6-v2) float32, clustered (groups of 50 around random centres),
one namespace, static threshold 0.9; queries are perturbed copies of stored vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD_REV = "c085b36"  # the engine before issue 14 (per-entry objects, remove_ids eviction)


# ----------------------------------------------------------------------------- one engine (worker)
def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def clustered(n: int, dim: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pct(samples_s) -> dict:
    import numpy as np

    ms = np.asarray(samples_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def measure(entries: int, dim: int, index: str, queries: int, seed: int = 0) -> dict:
    import gc

    import numpy as np

    import raycache
    from raycache.cache import LRUEviction, SemanticCache, StaticThreshold

    vectors = clustered(entries + queries, dim, seed)
    prompts = [f"prompt {i:08d}" for i in range(entries + queries)]
    text_bytes = sum(len(p) for p in prompts[:entries]) * 2  # prompt + an equally long response
    gc.collect()
    cache = SemanticCache(None, dim, index=index, eviction=LRUEviction(entries), policy=StaticThreshold(0.9))
    rss0 = rss_bytes()
    started = time.perf_counter()
    for lo in range(0, entries, 1000):
        hi = min(lo + 1000, entries)
        cache.store_batch(prompts[lo:hi], prompts[lo:hi], vectors=vectors[lo:hi])
    store_s = time.perf_counter() - started
    gc.collect()
    rss1 = rss_bytes()

    rng = np.random.default_rng(seed + 1)
    targets = rng.integers(0, entries, queries)
    noisy = vectors[targets] + 0.02 * rng.standard_normal((queries, dim)).astype(np.float32)
    lookups, found = [], 0
    for i in range(queries):
        t = time.perf_counter()
        result = cache.check(f"query {i}", vector=noisy[i])
        lookups.append(time.perf_counter() - t)
        found += result.entry_id is not None and result.matched_prompt == prompts[targets[i]]

    at_capacity = []
    for i in range(queries):  # each store evicts the least recently used entry
        t = time.perf_counter()
        cache.store(prompts[entries + i], "new", vector=vectors[entries + i])
        at_capacity.append(time.perf_counter() - t)

    t = time.perf_counter()
    snap = cache.snapshot()
    snapshot_s = time.perf_counter() - t
    del snap
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.npz"
        t = time.perf_counter()
        cache.save(path)
        save_s = time.perf_counter() - t
        file_mb = path.stat().st_size / 2**20
        t = time.perf_counter()
        restored = SemanticCache.load(path, index=index, eviction=LRUEviction(entries),
                                      policy=StaticThreshold(0.9))
        restore_s = time.perf_counter() - t
        assert len(restored) == len(cache)
    return {
        "raycache": str(Path(raycache.__file__).parent), "entries": entries, "dim": dim, "index": index,
        "bytes_per_entry": (rss1 - rss0) / entries, "text_bytes_per_entry": text_bytes / entries,
        "store_per_s": entries / store_s, "lookup": pct(lookups), "recall_at_1": found / queries,
        "store_at_capacity": pct(at_capacity), "snapshot_s": snapshot_s, "save_s": save_s,
        "file_mb": file_mb, "restore_s": restore_s,
    }


# ----------------------------------------------------------------------------- driver
def old_package(rev: str, into: Path) -> Path:
    """The ``raycache`` package of ``rev``, extracted under ``into`` (git archive; nothing else
    in the repository changes)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "raycache"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_worker(root: Path, entries: int, dim: int, index: str, queries: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--entries", str(entries),
                          "--dim", str(dim), "--index", index, "--queries", str(queries)],
                         env=env, check=True, capture_output=True, text=True, cwd=str(root))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(result["raycache"]).resolve() != (root / "raycache").resolve():
        raise SystemExit(f"the worker imported {result['raycache']}, not {root / 'raycache'}")
    return result


def table(rows: list[tuple[str, dict]]) -> str:
    headers = ["engine", "entries", "bytes/entry (RSS, texts incl.)", "text bytes/entry", "stores/s",
               "lookup p50 ms", "lookup p99 ms", "recall@1", "store at capacity p50 ms", "p99 ms",
               "snapshot s", "save s", "restore s"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, r in rows:
        cells = [name, f"{r['entries']:,}", f"{r['bytes_per_entry']:,.0f}", f"{r['text_bytes_per_entry']:.0f}",
                 f"{r['store_per_s']:,.0f}", f"{r['lookup']['p50_ms']:.3g}", f"{r['lookup']['p99_ms']:.3g}",
                 f"{r['recall_at_1']:.3f}", f"{r['store_at_capacity']['p50_ms']:.3g}",
                 f"{r['store_at_capacity']['p99_ms']:.3g}", f"{r['snapshot_s']:.3g}", f"{r['save_s']:.3g}",
                 f"{r['restore_s']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, action="append", help="cache size (repeatable; default 10000)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--index", default="flat", choices=["flat", "hnsw"])
    parser.add_argument("--queries", type=int, default=1000, help="single lookups and stores at capacity timed")
    parser.add_argument("--old-rev", default=OLD_REV, help="git revision of the old engine")
    parser.add_argument("--no-old", action="store_true", help="measure this checkout only")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = args.entries or [10_000]
    if args.worker:
        print(json.dumps(measure(sizes[0], args.dim, args.index, args.queries)))
        return {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="rc-old-engine-") as tmp:
        old_root = None if args.no_old else old_package(args.old_rev, Path(tmp))
        for n in sizes:
            if old_root is not None:
                rows.append((f"old ({args.old_rev})", run_worker(old_root, n, args.dim, args.index, args.queries)))
            rows.append(("new", run_worker(REPO, n, args.dim, args.index, args.queries)))
            print(table(rows[-2:] if old_root is not None else rows[-1:]), flush=True)
    print(f"\nindex {args.index}, dim {args.dim}, load average at the end {os.getloadavg()[0]:.1f}")
    print(table(rows))
    payload = {"rows": [{"engine": name, **r} for name, r in rows], "old_rev": args.old_rev}
    if args.out:
        args.out.write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
