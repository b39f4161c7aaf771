"""Per-request calibration across group-disjoint halves of a real stream: does the bound hold?

The stream (QQP dev by default, from ``../shared/data``) is embedded once with the base encoder and
split by group into a calibration and a test half, for several seeds. On each calibration half
``raycache calibrate``'s rule (fixed-sequence testing, one-sided Clopper–Pearson bound) picks the
threshold for δ, once per way of counting correlated arrivals (``--clusters``: none = binomial,
group, confusion = the default); the test half is replayed at that threshold. Printed per rule: the
test false-hit rate per split, how many splits stay within δ, and the correct-hit rate relative to
the best static threshold chosen on the test half itself.

    python bench/calibration_splits.py --seeds 6 --delta 0.02
    python bench/calibration_splits.py --clusters confusion --horizons none,test   # realised-rate bound
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", default=str(DATA / "streams" / "stream_qqp_dev.jsonl"))
    ap.add_argument("--embeddings", default=None, help=".npy of the stream's vectors (written if missing)")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--delta", type=float, default=0.02)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--clusters", default="none,group,confusion")
    ap.add_argument("--horizons", default="none",
                    help="comma list: none (bound the traffic's rate), calibration (the realised rate "
                         "over as many requests as the calibration half: raycache calibrate's default), "
                         "test (over the test half's length) or a number of requests; one rule per "
                         "clusters×horizon")
    args = ap.parse_args(argv)
    from raycache.data import read_stream
    from raycache.encoder import Encoder
    from raycache.simulation import operating_point_split

    stream = read_stream(args.stream)
    cache = Path(args.embeddings) if args.embeddings else None
    if cache is not None and cache.exists():
        vectors = np.load(cache)
    else:
        t0 = time.time()
        vectors = Encoder.load(None, device="cpu").encode(stream["prompt"].tolist())
        print(f"embedded {len(stream)} prompts in {time.time() - t0:.0f} s", flush=True)
        if cache is not None:
            np.save(cache, vectors)
    grid = [round(0.85 + 0.005 * i, 3) for i in range(30)]
    horizons = [None if h == "none" else h if h in ("test", "calibration") else int(h)
                for h in args.horizons.split(",")]
    rules = [f"{c}" if h is None else f"{c}, horizon={h}" for c in args.clusters.split(",") for h in horizons]
    settings = {f"{c}" if h is None else f"{c}, horizon={h}": (c, h)
                for c in args.clusters.split(",") for h in horizons}
    rows: dict[str, list[tuple[float, float, float]]] = {r: [] for r in rules}
    for seed in range(args.seeds):
        for rule in rules:
            clusters, horizon = settings[rule]
            entry = operating_point_split(stream, vectors, seed=seed, thresholds=grid, clusters=clusters,
                                          horizon=horizon, deltas=(args.delta,),
                                          confidence=args.confidence)["deltas"][0]
            chosen, ratio = entry["fixed_sequence"], entry["fixed_sequence_vs_best"]
            rows[rule].append((chosen["threshold"] or float("nan"), chosen["false_hit_rate"],
                               float("nan") if ratio is None else ratio))
            print(f"seed {seed} clusters={rule}: threshold {chosen['threshold']} test false-hit "
                  f"{chosen['false_hit_rate']:.4f} correct-hit {chosen['correct_hit_rate']:.4f} "
                  f"({rows[rule][-1][2]:.2f}x best on test)", flush=True)
    print(f"\nδ = {args.delta:g}, confidence {args.confidence:g}, {args.seeds} group splits, load "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| clusters | thresholds | test false-hit per split | splits within δ | correct-hit vs best on test |")
    print("|---|---|---|---:|---|")
    for rule, r in rows.items():
        ts = " ".join(f"{t:.3f}" for t, _, _ in r)
        fhs = " ".join(f"{fh:.4f}" for _, fh, _ in r)
        within = sum(fh <= args.delta + 1e-12 for _, fh, _ in r)
        ratios = [x for _, _, x in r if x == x]
        span = f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "-"
        print(f"| {rule} | {ts} | {fhs} | {within} / {len(r)} | {span} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
