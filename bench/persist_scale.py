"""Persistence at scale, in one run: the full snapshot file (``save`` / ``load``) against the
incremental segment log (``PeriodicFlush``: first base, steady-state flushes, compaction, restore).

    python -m bench.persist_scale --entries 10000                        # a quick check
    python -m bench.persist_scale --entries 100000 --entries 1000000    # the issue's sizes

Cache: ``--index`` (flat by default; ivf/hnsw with their default parameters), dim ``--dim`` (384) float32 unit vectors, ``prompt <i>`` / ``response <i>`` texts
(~15 bytes each), capacity = entries. A flush interval's changes: ``--changed`` × entries new
entries (each evicting the least recently used one) and as many semantic hits on random entries;
``--segments`` such flushes, then restore from base + segments, compaction, restore from the
compacted base. "lock" columns: time inside ``snapshot()`` (old) / ``take_changes()`` (new), the
part that holds the cache lock (an upper bound for the new one: it includes stacking the vectors
after the lock is released). ``uptime`` load is printed before and after each size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def unit_vectors(n: int, dim: int, rng) -> "object":
    import numpy as np

    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def folder_mb(path: Path, prefix: str) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith(prefix)) / 2**20


def measure(entries: int, dim: int = 384, changed: float = 0.01, segments: int = 5, seed: int = 0,
            tmp_dir: str | None = None, index: str = "flat") -> dict:
    import numpy as np

    from raycache.cache import LRUEviction, PeriodicFlush, SemanticCache, StaticThreshold

    rng = np.random.default_rng(seed)
    out: dict = {"entries": entries, "dim": dim, "index": index, "changed_per_flush": changed,
                 "segments": segments, "load_before": uptime()}

    def new_cache() -> SemanticCache:
        return SemanticCache(None, dim, index=index, eviction=LRUEviction(entries), policy=StaticThreshold(0.9))

    cache = new_cache()
    next_text = 0

    def add(n: int) -> None:
        nonlocal next_text
        for lo in range(0, n, 1000):
            k = min(1000, n - lo)
            texts = [f"prompt {i}" for i in range(next_text, next_text + k)]
            cache.store_batch(texts, [t.replace("prompt", "response") for t in texts],
                              vectors=unit_vectors(k, dim, rng))
            next_text += k

    add(entries)
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="rc-persist-", dir=tmp_dir) as tmp:
        folder = Path(tmp)
        # ------------------------------------------------------------ the full snapshot file
        t = time.perf_counter()
        snap = cache.snapshot()
        out["old_lock_s"] = time.perf_counter() - t
        del snap
        npz = folder / "cache.npz"
        t = time.perf_counter()
        cache.save(npz)
        out["old_save_s"] = time.perf_counter() - t
        out["old_file_mb"] = npz.stat().st_size / 2**20
        gc.collect()
        t = time.perf_counter()
        restored = SemanticCache.load(npz, index=index, eviction=LRUEviction(entries), policy=StaticThreshold(0.9))
        out["old_restore_s"] = time.perf_counter() - t
        assert len(restored) == entries
        del restored
        npz.unlink()
        gc.collect()

        # ------------------------------------------------------------ the segment log
        log = folder / "log"
        flush = PeriodicFlush(log, cache, interval_s=3600, compact_segments=10**9, compact_ratio=1e9)
        locks: list[float] = []
        take = cache.take_changes

        def timed_take(*args, **kwargs):
            started = time.perf_counter()
            try:
                return take(*args, **kwargs)
            finally:
                locks.append(time.perf_counter() - started)

        cache.take_changes = timed_take  # type: ignore[method-assign]
        t = time.perf_counter()
        assert flush.save()
        out["base_s"], out["base_lock_s"] = time.perf_counter() - t, locks[-1]
        out["base_mb"] = folder_mb(log, "base-")
        k = max(1, int(changed * entries))
        flush_s, flush_lock = [], []
        for _ in range(segments):
            add(k)  # k new entries, k evictions
            ids = np.asarray(cache.eviction.order(), np.int64)
            hits = [cache.entries.prompts[cache.entries.slot(i)] for i in rng.choice(ids, k, replace=False).tolist()]
            assert all(r.exact for r in cache.check_batch(hits))  # k exact-tier hits: each moves an entry
            t = time.perf_counter()
            assert flush.save()
            flush_s.append(time.perf_counter() - t)
            flush_lock.append(locks[-1])
        out["flush_s"] = float(np.median(flush_s))
        out["flush_lock_ms"] = float(np.median(flush_lock)) * 1e3
        out["segment_mb"] = folder_mb(log, "seg-") / segments
        order = cache.eviction.order()
        del cache.take_changes
        gc.collect()

        t = time.perf_counter()
        again = new_cache()
        PeriodicFlush(log, again, interval_s=3600).restore()
        out["log_restore_s"] = time.perf_counter() - t
        assert again.eviction.order() == order, "the log restored another LRU order"
        del again
        gc.collect()
        t = time.perf_counter()
        assert flush.compact()
        out["compact_s"] = time.perf_counter() - t
        gc.collect()
        t = time.perf_counter()
        again = new_cache()
        PeriodicFlush(log, again, interval_s=3600).restore()
        out["base_restore_s"] = time.perf_counter() - t
        assert again.eviction.order() == order
        del again
    out["load_after"] = uptime()
    return out


HEADERS = ["entries", "old: snapshot under lock s", "old: save s", "old: restore s", "old: file MB",
           "log: first base s", "log: flush (changed) s", "log: flush lock ms", "log: segment MB",
           "log: restore (base + segments) s", "log: compaction s", "log: restore (base) s", "log: base MB"]


def row(r: dict) -> list:
    return [f"{r['entries']:,}", f"{r['old_lock_s']:.3g}", f"{r['old_save_s']:.3g}", f"{r['old_restore_s']:.3g}",
            f"{r['old_file_mb']:,.0f}", f"{r['base_s']:.3g}", f"{r['flush_s']:.3g}", f"{r['flush_lock_ms']:.3g}",
            f"{r['segment_mb']:.3g}", f"{r['log_restore_s']:.3g}", f"{r['compact_s']:.3g}",
            f"{r['base_restore_s']:.3g}", f"{r['base_mb']:,.0f}"]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---:|" * len(HEADERS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, action="append", help="cache size (repeatable; default 10000)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of entries new (and hit) per flush")
    parser.add_argument("--segments", type=int, default=5, help="flushes before the restore and compaction")
    parser.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivf"])
    parser.add_argument("--tmp", help="folder for the files (default: the system temp folder)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = []
    for n in args.entries or [10_000]:
        results.append(measure(n, args.dim, args.changed, args.segments, tmp_dir=args.tmp, index=args.index))
        r = results[-1]
        print(f"{n:,} entries: load before: {r['load_before']}\n  after: {r['load_after']}", flush=True)
        print(table(results[-1:]), flush=True)
    print(f"\nindex {args.index}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
