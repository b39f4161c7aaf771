"""Fine-tuning throughput: ``raycache train`` (Ray Train, 1 worker) beside a plain PyTorch loop.

Both train the same model (the embedded MiniLM + similarity head, BCE) on the same pairs with the
same batch size, max_length and torch threads, one epoch, and report pairs/s of the training steps
(model loading and Ray start-up excluded; the Ray job's wall time is printed too). The plain loop is
the textbook one: shuffled batches in file order, fp32, AdamW, no length bucketing.

    python bench/train_throughput.py --pairs ../shared/data/pairs/qqp_dev.jsonl --n 1024 --threads 2

Run it alone: the two contenders are timed one after the other on the same cores, and the ratio is
only meaningful when nothing else runs (the load average is printed beside the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def plain_loop(pairs, batch_size: int, max_length: int, threads: int, seed: int = 0) -> float:
    """pairs/s of a plain PyTorch fine-tuning loop over ``pairs`` (one epoch)."""
    from raycache.encoder import Encoder
    from raycache.training import BCELoss, PairScorer, SimilarityHead

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    scorer = PairScorer(Encoder.load(None, device="cpu", max_length=max_length), SimilarityHead(0.05, 17.0))
    opt = torch.optim.AdamW(scorer.parameters(), lr=1e-4)
    loss_fn = BCELoss()
    order = np.random.default_rng(seed).permutation(len(pairs))
    a, b = pairs["prompt_a"].tolist(), pairs["prompt_b"].tolist()
    y = pairs["label"].to_numpy(dtype=np.float32)
    scorer.train()
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        logits = scorer([a[i] for i in idx], [b[i] for i in idx])
        loss = loss_fn(logits, torch.from_numpy(y[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return len(order) / (time.perf_counter() - t0)


def ray_train(pairs_path: str, n: int, batch_size: int, max_length: int, threads: int) -> dict:
    """pairs/s of the training epoch of ``raycache train`` (and the job's wall time)."""
    from raycache.config import TrainConfig
    from raycache.training.job import run

    with tempfile.TemporaryDirectory(prefix="rc-bench-train-") as tmp:
        t0 = time.perf_counter()
        cfg = TrainConfig(pairs=pairs_path, out=tmp, epochs=1, batch_size=batch_size,
                          encoder={"max_length": max_length}, torch_threads=threads,
                          val_fraction=0.1)
        run(cfg)
        wall = time.perf_counter() - t0
        metrics = json.loads((Path(tmp) / "train_metrics.json").read_text())
    epoch = metrics["epochs"][0]
    return {"pairs_per_s": epoch["pairs_per_s"], "pairs": epoch["pairs"], "job_wall_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=str(Path(__file__).resolve().parents[2] / "shared/data/pairs/qqp_dev.jsonl"))
    ap.add_argument("--n", type=int, default=1024, help="training pairs per contender")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from raycache.data import read_pairs, write_table

    pairs = read_pairs(args.pairs).sample(frac=1.0, random_state=0).reset_index(drop=True)
    # the Ray job holds out 10% for validation; give it enough that it trains on ~n pairs
    n_ray = int(np.ceil(args.n / 0.9))
    with tempfile.TemporaryDirectory(prefix="rc-bench-pairs-") as tmp:
        path = str(Path(tmp) / "pairs.jsonl")
        write_table(pairs.iloc[:n_ray], path)
        load0 = os.getloadavg()[0]
        plain = plain_loop(pairs.iloc[:args.n], args.batch_size, args.max_length, args.threads)
        ray_res = ray_train(path, n_ray, args.batch_size, args.max_length, args.threads)
        load1 = os.getloadavg()[0]
    print(f"| contender | pairs/s | ratio |\n|---|---:|---:|\n"
          f"| plain PyTorch loop (fp32, no bucketing) | {plain:.1f} | 1.00 |\n"
          f"| raycache train (Ray Train, 1 worker) | {ray_res['pairs_per_s']:.1f} | "
          f"{ray_res['pairs_per_s'] / plain:.2f} |\n"
          f"pairs {args.n} (ray: {ray_res['pairs']}), batch {args.batch_size}, max_length {args.max_length}, "
          f"threads {args.threads}, ray job wall {ray_res['job_wall_s']:.0f} s, "
          f"load avg {load0:.2f} -> {load1:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
