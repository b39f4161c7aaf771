"""Benchmark 2: nearest-entry lookup, raycache's indexes and engine vs brute-force numpy vs FAISS flat.

Cached entries are unit vectors (dim 384) either uniform on the sphere ("random": the hard case for
an approximate index) or around 1,000 topic centres ("clustered": closer to real prompt embeddings).
Queries are fresh draws from the same distribution, looked up one at a time (p50/p99 latency, the
contenders alternating per query) and in batches of 64 (microseconds per query). recall@1 of the
approximate index is against the exact top-1.

Every contender runs single-threaded (BLAS and OpenMP pools limited to ``--threads``, default 1): the
usual setting for latency serving (one query per core), and the only fair one here: numpy's OpenBLAS
pool and FAISS's OpenMP pool spin-wait, so alternating them with 2 threads each on 2 loaded cores
puts tens of milliseconds of scheduler waits into whichever runs next.

    python -m bench.lookup                      # 10k, 100k and 1M entries, ~10 min, ~6 GB RAM
    python -m bench.lookup --sizes 10000 --quick
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Callable, Sequence

import numpy as np

from bench.common import latency_ms, markdown_table, setup_env, write_results
from raycache.numeric import unit_rows

DIM = 384
N_CENTRES = 1000
BATCH = 64

SearchFn = Callable[[np.ndarray], np.ndarray]  # queries [m, dim] -> top-1 entry ids [m]


def make_vectors(n: int, kind: str, rng: np.random.Generator, centres: np.ndarray | None = None) -> np.ndarray:
    """[n, DIM] float32 unit rows: uniform on the sphere, or a random centre plus noise (cos ~0.7)."""
    if kind == "random":
        return unit_rows(rng.standard_normal((n, DIM), dtype=np.float32))
    if kind == "clustered":
        assert centres is not None
        out = np.empty((n, DIM), np.float32)
        for start in range(0, n, 100_000):  # chunked: bounded temporaries at 1M rows
            m = min(100_000, n - start)
            noise = rng.standard_normal((m, DIM), dtype=np.float32) * (0.9 / np.sqrt(DIM))
            out[start:start + m] = unit_rows(centres[rng.integers(0, len(centres), m)] + noise)
        return out
    raise ValueError(f"unknown vector kind {kind!r}; expected 'random' or 'clustered'")


def build_contenders(entries: np.ndarray, hnsw: bool, engine: bool) -> tuple[dict[str, SearchFn], dict]:
    """name -> search function over ``entries`` (ids = row numbers), and build seconds per name."""
    import faiss

    from raycache.index import FlatIndex, HNSWIndex

    ids = np.arange(len(entries), dtype=np.int64)
    build_s: dict[str, float] = {}
    contenders: dict[str, SearchFn] = {
        "numpy brute force": lambda q: np.argmax(q @ entries.T, axis=1) if len(q) > 1
        else np.array([np.argmax(entries @ q[0])]),
    }
    start = time.perf_counter()
    faiss_flat = faiss.IndexFlatIP(DIM)
    faiss_flat.add(entries)
    build_s["faiss IndexFlatIP"] = time.perf_counter() - start
    contenders["faiss IndexFlatIP"] = lambda q: faiss_flat.search(q, 1)[1][:, 0]

    start = time.perf_counter()
    flat = FlatIndex(DIM)
    flat.add(ids, entries)
    build_s["raycache FlatIndex"] = time.perf_counter() - start
    contenders["raycache FlatIndex"] = lambda q: flat.search(q, 1)[1][:, 0]

    if hnsw:
        start = time.perf_counter()
        graph = HNSWIndex(DIM)
        graph.add(ids, entries)
        build_s["raycache HNSWIndex"] = time.perf_counter() - start
        contenders["raycache HNSWIndex"] = lambda q: graph.search(q, 1)[1][:, 0]
    if engine:
        contenders["raycache engine check (flat)"], build_s["raycache engine check (flat)"] = engine_search(
            entries)
    return contenders, build_s


def engine_search(entries: np.ndarray) -> tuple[SearchFn, float]:
    """raycache's full check path (exact tier, scope, index, policy, stats) on precomputed vectors."""
    from raycache.cache.engine import SemanticCache
    from raycache.cache.policy import StaticThreshold

    start = time.perf_counter()
    cache = SemanticCache(None, DIM, index="flat", policy=StaticThreshold(-1.0))
    chunk = 50_000
    first_id = None
    for lo in range(0, len(entries), chunk):
        block = entries[lo:lo + chunk]
        names = [f"entry {i}" for i in range(lo, lo + len(block))]
        got = cache.store_batch(names, names, vectors=block)
        first_id = got[0] if first_id is None else first_id
    build = time.perf_counter() - start
    counter = iter(range(10**12))

    def search(q: np.ndarray) -> np.ndarray:
        prompts = [f"query {next(counter)}" for _ in range(len(q))]  # never an exact-tier hit
        results = cache.check_batch(prompts, vectors=q)
        return np.array([r.entry_id - first_id for r in results], np.int64)

    return search, build


def single_query_latency(contenders: dict[str, SearchFn], queries: np.ndarray) -> tuple[dict, dict]:
    """Per-query latency, contenders alternating order per query; also each one's top-1 ids."""
    names = list(contenders)
    seconds = {name: [] for name in names}
    top1 = {name: np.empty(len(queries), np.int64) for name in names}
    for i in range(len(queries)):
        q = queries[i:i + 1]
        for name in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            top1[name][i] = contenders[name](q)[0]
            seconds[name].append(time.perf_counter() - start)
    return seconds, top1


def batch_latency(contenders: dict[str, SearchFn], queries: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Microseconds per query when searching ``BATCH`` queries per call (median of interleaved rounds)."""
    names = list(contenders)
    per_call = {name: [] for name in names}
    batches = [queries[i:i + BATCH] for i in range(0, len(queries) - BATCH + 1, BATCH)] or [queries]
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            for b in batches:
                contenders[name](b)
            per_call[name].append((time.perf_counter() - start) / sum(len(b) for b in batches))
    return {name: float(np.median(v)) * 1e6 for name, v in per_call.items()}


def run_case(n: int, kind: str, n_queries: int, hnsw: bool, engine: bool, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((N_CENTRES, DIM), dtype=np.float32)) if kind == "clustered" else None
    entries = make_vectors(n, kind, rng, centres)
    queries = make_vectors(n_queries, kind, rng, centres)
    contenders, build_s = build_contenders(entries, hnsw, engine)
    seconds, top1 = single_query_latency(contenders, queries)
    exact = top1["faiss IndexFlatIP"]
    exact_sim = np.einsum("ij,ij->i", queries, entries[exact])
    case = {"n_entries": n, "kind": kind, "n_queries": n_queries, "build_s": build_s,
            "single": {name: latency_ms(v) for name, v in seconds.items()},
            "batch_us_per_query": batch_latency(contenders, queries),
            # a different id with the same similarity (a tie) still counts as correct
            "recall_at_1": {name: float(np.mean(np.isclose(
                np.einsum("ij,ij->i", queries, entries[ids]), exact_sim, atol=1e-6)))
                for name, ids in top1.items()}}
    del contenders, entries
    gc.collect()
    return case


def table_rows(case: dict, baseline: str = "numpy brute force") -> list[list]:
    rows = []
    base_p50 = case["single"][baseline]["p50_ms"]
    for name, lat in case["single"].items():
        rows.append([f"{case['n_entries']:,}", case["kind"], name, lat["p50_ms"], lat["p99_ms"],
                     f"{base_p50 / lat['p50_ms']:.2f}x", case["batch_us_per_query"][name],
                     case["recall_at_1"][name], case["build_s"].get(name)])
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="random,clustered")
    parser.add_argument("--queries", type=int, default=200, help="single queries per case")
    parser.add_argument("--hnsw-max", type=int, default=100_000,
                        help="largest size that builds the HNSW index (1M takes far over 15 min on 2 cores)")
    parser.add_argument("--engine-max", type=int, default=100_000, help="largest size for the engine path")
    parser.add_argument("--quick", action="store_true", help="toy size: proves the code path, measures nothing")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for every contender")
    parser.add_argument("--faiss-blas-threshold", type=int, default=None,
                        help="set faiss.cvar.distance_compute_blas_threshold (FAISS 1.15 default: 128000, so "
                             "batches below that many queries skip BLAS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.queries = "2000", 70
    setup_env()
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(args.threads)
    if args.faiss_blas_threshold is not None:
        faiss.cvar.distance_compute_blas_threshold = args.faiss_blas_threshold
    cases = []
    rows = []
    with threadpool_limits(limits=args.threads):
        for n in (int(s) for s in args.sizes.split(",")):
            for kind in args.kinds.split(","):
                start = time.perf_counter()
                case = run_case(n, kind, args.queries, hnsw=n <= args.hnsw_max, engine=n <= args.engine_max,
                                seed=args.seed)
                case["case_s"] = time.perf_counter() - start
                cases.append(case)
                rows += table_rows(case)
                print(f"done {n:,} {kind} in {case['case_s']:.0f}s", flush=True)
    headers = ["entries", "vectors", "contender", "p50 ms", "p99 ms", "speed vs numpy (p50)",
               f"batch-{BATCH} µs/query", "recall@1", "build s"]
    print(f"\nLookup, dim {DIM}: {args.queries} single queries per case (contenders alternating per query), "
          f"{args.threads} thread(s) each\n")
    print(markdown_table(headers, rows))
    path = write_results("lookup", {"dim": DIM, "batch": BATCH, "threads": args.threads, "cases": cases,
                                    "faiss_blas_threshold": faiss.cvar.distance_compute_blas_threshold},
                         args.out, quick=args.quick)
    print(f"\nwrote {path}")
    return {"cases": cases}


if __name__ == "__main__":
    main()
