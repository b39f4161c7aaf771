"""The cache engine at scale, old against new in one run: bytes per entry, store throughput,
single-query latency, store latency at capacity (each store evicts one entry), snapshot, save and
restore times, and the index's recall@1 against exact search on fresh clustered queries (hnsw vs
flat: run once with each ``--index``). ``--conversations`` measures the per-history overhead
instead: N conversations x ``--turns`` turns, each turn stored in the scope of the turns before it
(so nearly every scope holds one entry): bytes per entry and lookup latency, against the engine
that kept one index per scope (``--history-old-rev``).

Each engine runs in its own fresh Python process (so its memory is measured alone): "new" is this
checkout's ``raycache``; "old" is the ``raycache`` package of git revision ``--old-rev`` (default:
the last commit before the columnar engine), extracted with ``git archive`` into a temporary folder
(the working tree and the repository are not touched).

    python -m bench.engine_scale --entries 10000                 # a quick check
    python -m bench.engine_scale --entries 100000 --entries 1000000   # the issue's sizes (alone on the machine)
    python -m bench.engine_scale --index hnsw --entries 100000 --entries 1000000
    python -m bench.engine_scale --conversations 10000 --turns 3      # per-history overhead

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
HISTORY_OLD_REV = "10e8530"  # the columnar engine with one vector index per scope (per history)


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


def exact_top1(base, queries):
    """Row of ``base`` [n, dim] nearest each query [m, dim] (exact; chunks of 64 queries)."""
    import numpy as np

    return np.concatenate([(base @ queries[lo:lo + 64].T).argmax(axis=0) for lo in range(0, len(queries), 64)])


def index_recall(cache, vectors, ids, fresh) -> float:
    """recall@1 of the cache's (one) namespace index on ``fresh`` queries against exact search over
    the stored ``vectors`` (entry ``ids[j]`` holds row j)."""
    import numpy as np

    (index,) = cache._indexes.values()
    found = index.search(fresh, 1)[1][:, 0]
    return float(np.mean(found == np.asarray(ids)[exact_top1(vectors, fresh)]))


def measure(entries: int, dim: int, index: str, queries: int, seed: int = 0, recall_queries: int = 200) -> dict:
    import gc

    import numpy as np

    import raycache
    from raycache.cache import LRUEviction, SemanticCache, StaticThreshold

    vectors = clustered(entries + queries + recall_queries, dim, seed)
    fresh = vectors[entries + queries:]  # new points of the same clusters, not copies of entries
    vectors = vectors[:entries + queries]
    prompts = [f"prompt {i:08d}" for i in range(entries + queries)]
    text_bytes = sum(len(p) for p in prompts[:entries]) * 2  # prompt + an equally long response
    gc.collect()
    cache = SemanticCache(None, dim, index=index, eviction=LRUEviction(entries), policy=StaticThreshold(0.9))
    rss0 = rss_bytes()
    started = time.perf_counter()
    ids = []
    for lo in range(0, entries, 1000):
        hi = min(lo + 1000, entries)
        ids += cache.store_batch(prompts[lo:hi], prompts[lo:hi], vectors=vectors[lo:hi])
    store_s = time.perf_counter() - started
    gc.collect()
    rss1 = rss_bytes()
    recall_exact = index_recall(cache, vectors[:entries], ids, fresh) if recall_queries else None

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
        "recall_at_1_vs_exact": recall_exact,
        "store_at_capacity": pct(at_capacity), "snapshot_s": snapshot_s, "save_s": save_s,
        "file_mb": file_mb, "restore_s": restore_s,
    }


def measure_histories(conversations: int, turns: int, dim: int, index: str, queries: int, seed: int = 0) -> dict:
    """``conversations`` x ``turns`` entries, turn t stored in the scope of the conversation's first
    t turns (turn 0: no history); then ``queries`` single lookups of perturbed turns in their own
    scope (each should hit) and as many in the next conversation's scope (none may)."""
    import gc

    import numpy as np

    import raycache
    from raycache.cache import LRUEviction, SemanticCache, StaticThreshold

    n = conversations * turns
    vectors = clustered(n, dim, seed)
    turn_text = [[f"conversation {c} turn {t}" for t in range(turns)] for c in range(conversations)]
    histories = [turn_text[c][:t] or None for c in range(conversations) for t in range(turns)]
    prompts = [turn_text[c][t] for c in range(conversations) for t in range(turns)]
    gc.collect()
    cache = SemanticCache(None, dim, index=index, eviction=LRUEviction(n), policy=StaticThreshold(0.9))
    rss0 = rss_bytes()
    started = time.perf_counter()
    for lo in range(0, n, 1000):
        hi = min(lo + 1000, n)
        cache.store_batch(prompts[lo:hi], prompts[lo:hi], histories=histories[lo:hi], vectors=vectors[lo:hi])
    store_s = time.perf_counter() - started
    gc.collect()
    rss1 = rss_bytes()

    rng = np.random.default_rng(seed + 1)
    targets = rng.integers(0, n, queries)
    noisy = vectors[targets] + 0.02 * rng.standard_normal((queries, dim)).astype(np.float32)
    own, other, hits, crossed = [], [], 0, 0
    for i, j in enumerate(targets.tolist()):
        t = time.perf_counter()
        result = cache.check(f"query {i}", history=histories[j], vector=noisy[i])
        own.append(time.perf_counter() - t)
        hits += result.hit and result.matched_prompt == prompts[j]
        c, turn = divmod(j, turns)
        elsewhere = turn_text[(c + 1) % conversations][:turn] or [f"unseen {i}"]
        t = time.perf_counter()
        crossed += cache.check(f"query {i}", history=elsewhere, vector=noisy[i]).matched_prompt == prompts[j]
        other.append(time.perf_counter() - t)
    t = time.perf_counter()
    batch = cache.check_batch([f"query {i}" for i in range(queries)], histories=[histories[j] for j in targets],
                              vectors=noisy)
    batch_s = time.perf_counter() - t
    assert sum(r.hit for r in batch) >= hits
    return {
        "raycache": str(Path(raycache.__file__).parent), "conversations": conversations, "turns": turns,
        "entries": n, "dim": dim, "index": index, "scopes": cache.stats()["scopes"],
        "bytes_per_entry": (rss1 - rss0) / n, "vector_bytes_per_entry": 4 * dim, "store_per_s": n / store_s,
        "lookup_own_scope": pct(own), "lookup_other_scope": pct(other), "hit_rate_own_scope": hits / queries,
        "cross_scope_hits": crossed, "batch_lookup_ms_per_query": batch_s * 1e3 / queries,
    }


# ----------------------------------------------------------------------------- driver
def old_package(rev: str, into: Path) -> Path:
    """The ``raycache`` package of ``rev``, extracted under ``into`` (git archive; nothing else
    in the repository changes)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "raycache"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_worker(root: Path, entries: int, dim: int, index: str, queries: int, turns: int = 0) -> dict:
    """One measurement in a fresh process importing ``root``'s raycache; ``turns`` > 0: the
    per-history one, ``entries`` conversations of ``turns`` turns."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    size = ["--conversations", str(entries), "--turns", str(turns)] if turns else ["--entries", str(entries)]
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *size,
                          "--dim", str(dim), "--index", index, "--queries", str(queries)],
                         env=env, check=True, capture_output=True, text=True, cwd=str(root))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(result["raycache"]).resolve() != (root / "raycache").resolve():
        raise SystemExit(f"the worker imported {result['raycache']}, not {root / 'raycache'}")
    return result


def table(rows: list[tuple[str, dict]]) -> str:
    headers = ["engine", "entries", "bytes/entry (RSS, texts incl.)", "text bytes/entry", "stores/s",
               "lookup p50 ms", "lookup p99 ms", "recall@1", "recall@1 vs exact (fresh queries)",
               "store at capacity p50 ms", "p99 ms", "snapshot s", "save s", "restore s"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, r in rows:
        cells = [name, f"{r['entries']:,}", f"{r['bytes_per_entry']:,.0f}", f"{r['text_bytes_per_entry']:.0f}",
                 f"{r['store_per_s']:,.0f}", f"{r['lookup']['p50_ms']:.3g}", f"{r['lookup']['p99_ms']:.3g}",
                 f"{r['recall_at_1']:.3f}",
                 "-" if r.get("recall_at_1_vs_exact") is None else f"{r['recall_at_1_vs_exact']:.3f}",
                 f"{r['store_at_capacity']['p50_ms']:.3g}",
                 f"{r['store_at_capacity']['p99_ms']:.3g}", f"{r['snapshot_s']:.3g}", f"{r['save_s']:.3g}",
                 f"{r['restore_s']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def history_table(rows: list[tuple[str, dict]]) -> str:
    headers = ["engine", "conversations x turns", "scopes", "bytes/entry (RSS)", "vector bytes/entry",
               "stores/s", "own-scope lookup p50 ms", "p99 ms", "other-scope lookup p50 ms", "p99 ms",
               "batched ms/query", "own-scope hit rate", "cross-scope hits"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, r in rows:
        cells = [name, f"{r['conversations']:,} x {r['turns']}", f"{r['scopes']:,}", f"{r['bytes_per_entry']:,.0f}",
                 f"{r['vector_bytes_per_entry']}", f"{r['store_per_s']:,.0f}",
                 f"{r['lookup_own_scope']['p50_ms']:.3g}", f"{r['lookup_own_scope']['p99_ms']:.3g}",
                 f"{r['lookup_other_scope']['p50_ms']:.3g}", f"{r['lookup_other_scope']['p99_ms']:.3g}",
                 f"{r['batch_lookup_ms_per_query']:.3g}", f"{r['hit_rate_own_scope']:.3f}", str(r["cross_scope_hits"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, action="append", help="cache size (repeatable; default 10000)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivf"])
    parser.add_argument("--queries", type=int, default=1000, help="single lookups and stores at capacity timed")
    parser.add_argument("--conversations", type=int, action="append",
                        help="measure the per-history overhead instead: this many conversations (repeatable)")
    parser.add_argument("--turns", type=int, default=3, help="turns per conversation (with --conversations)")
    parser.add_argument("--old-rev", default=None,
                        help=f"git revision of the old engine (default {OLD_REV}; {HISTORY_OLD_REV} with --conversations)")
    parser.add_argument("--no-old", action="store_true", help="measure this checkout only")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.conversations and args.entries:
        parser.error("--entries and --conversations measure different things: give one")
    turns = args.turns if args.conversations else 0
    if args.conversations and turns < 1:
        parser.error("--turns must be at least 1")
    sizes = args.conversations or args.entries or [10_000]
    old_rev = args.old_rev or (HISTORY_OLD_REV if turns else OLD_REV)
    show = history_table if turns else table
    if args.worker:
        print(json.dumps(measure_histories(sizes[0], turns, args.dim, args.index, args.queries) if turns
                         else measure(sizes[0], args.dim, args.index, args.queries)))
        return {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="rc-old-engine-") as tmp:
        old_root = None if args.no_old else old_package(old_rev, Path(tmp))
        for n in sizes:
            if old_root is not None:
                rows.append((f"old ({old_rev})", run_worker(old_root, n, args.dim, args.index, args.queries, turns)))
            rows.append(("new", run_worker(REPO, n, args.dim, args.index, args.queries, turns)))
            print(show(rows[-2:] if old_root is not None else rows[-1:]), flush=True)
    print(f"\nindex {args.index}, dim {args.dim}, load average at the end {os.getloadavg()[0]:.1f}")
    print(show(rows))
    payload = {"rows": [{"engine": name, **r} for name, r in rows], "old_rev": old_rev}
    if args.out:
        args.out.write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
