"""FlatIndex top-1 search: FAISS's flat scan against one numpy matrix product (+ argmax), at a few
index sizes and batch sizes; the rule ``raycache.index.matmul_wins`` was read off this table.

    python -m bench.flat_search                       # sizes 64 .. 200,000, batches 1 .. 256
    python -m bench.flat_search --sizes 4096 --batches 1 4 16   # a quick check

Both sides run on the same FAISS storage, interleaved (``bench.common.interleaved``); the ratio is
the median per repetition of FAISS time / numpy time (> 1: numpy faster).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from bench.common import interleaved, markdown_table, median_ratio


def measure(sizes: list[int], batches: list[int], dim: int, budget_s: float = 0.2) -> list[dict]:
    import faiss

    from raycache.index import FlatIndex, _search_live, _top1_matmul, matmul_wins

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        x = rng.standard_normal((n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        index = FlatIndex(dim)
        index.add(np.arange(n), x)
        xb = faiss.rev_swig_ptr(index._flat.get_xb(), n * dim).reshape(n, dim)
        external = faiss.rev_swig_ptr(index._index.id_map.data(), n)
        for m in batches:
            q = x[rng.integers(0, n, m)]
            contenders = {"faiss": lambda: _search_live(index._index, q, 1, set(), n),
                          "numpy": lambda: _top1_matmul(q, xb, external, set())}
            once = interleaved(contenders, 1)
            repeats = int(min(200, max(3, budget_s / max(1e-6, sum(s[0] for s in once.values())))))
            seconds = interleaved(contenders, repeats)
            rows.append({"rows": n, "queries": m, "faiss_ms": float(np.median(seconds["faiss"])) * 1e3,
                         "numpy_ms": float(np.median(seconds["numpy"])) * 1e3,
                         "faiss_over_numpy": median_ratio(seconds["faiss"], seconds["numpy"]),
                         "rule_picks": "numpy" if matmul_wins(m, n) else "faiss"})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 4096, 32768, 200_000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 64, 256])
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args(argv)
    rows = measure(args.sizes, args.batches, args.dim)
    print(markdown_table(["rows", "queries", "faiss ms", "numpy ms", "faiss / numpy", "rule picks"],
                         [[r["rows"], r["queries"], r["faiss_ms"], r["numpy_ms"], r["faiss_over_numpy"],
                           r["rule_picks"]] for r in rows]))
    print(f"dim {args.dim}, load average {os.getloadavg()[0]:.1f}")
    return rows


if __name__ == "__main__":
    main()
