"""Fine-tuning recipes judged where users pay: correct-hit rate at a per-arrival false-hit budget.

Real data from ``../shared/data`` (not part of the repository): a pair file and the stream built from
the same prompts (QQP by default). The pair graph's connected components are dealt, whole, into
train / calibration / test parts (question-disjoint). Each recipe is fine-tuned with ``raycache
train`` on the train part's pairs; then the calibration and test parts of the stream are replayed
through the cache simulator (static threshold, unlimited cache). The threshold for each budget δ is
chosen on the calibration stream (the lowest threshold whose false-hit rate there is ≤ δ: the
empirical rule of ``raycache.simulation.operating_point``) and the figure is read on the test
stream; the best threshold on the test stream itself is printed beside it as an upper bound.

    python bench/finetune_recipes.py --recipes base,default,bce_v0 --out runs/recipes
    python bench/finetune_recipes.py --recipes base,default --out runs/recipes --reuse-models  # re-evaluate only
    python bench/finetune_recipes.py --pairs ../shared/data/pairs/nq_hard_dev.jsonl --stream none \
        --extra-train-pairs ../shared/data/pairs/nq_natural_dev.jsonl --recipes base,default --out runs/nq

Prints one table (and writes ``recipes.json``): pair AUC/AP on the test part's pairs, and per δ
the correct-hit and false-hit rate on the test stream.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
DELTAS = (0.01, 0.02, 0.05)

# name -> TrainConfig overrides (everything else: raycache train's defaults)
RECIPES: dict[str, dict] = {
    "bce_v0": dict(loss="bce", epochs=1, init_scale=0.1, init_bias=7.0, select_metric="auc",
                   length_bucketing=False, early_stopping_patience=0),  # the first release's recipe
    "bce_region": dict(loss="bce", epochs=1, init_scale=0.05, init_bias=17.0),
    "bce_region_w": dict(loss="bce", epochs=1, init_scale=0.05, init_bias=17.0, negative_weight=3.0),
    "bce_contrastive": dict(loss="bce", epochs=1, init_scale=0.05, init_bias=17.0,
                            contrastive_weight=1.0),
    "bce_contrastive_w": dict(loss="bce", epochs=1, init_scale=0.05, init_bias=17.0,
                              contrastive_weight=1.0, negative_weight=3.0),
    "sld_contrastive": dict(loss="sld", epochs=1, init_scale=0.05, init_bias=17.0,
                            contrastive_weight=1.0),
    "contrastive_only": dict(loss="bce", epochs=1, init_scale=0.05, init_bias=17.0,
                             contrastive_weight=1.0, negative_weight=1e-3),
    "bce_contrastive_hn": dict(loss="bce", epochs=1, init_scale=0.05, init_bias=17.0,
                               contrastive_weight=1.0, negative_weight=3.0, hard_negatives=2),
    "bce_contrastive_hn_e3": dict(loss="bce", epochs=3, init_scale=0.05, init_bias=17.0,
                                  contrastive_weight=1.0, negative_weight=3.0, hard_negatives=2),
    "bce_contrastive_e3": dict(loss="bce", epochs=3, init_scale=0.05, init_bias=17.0,
                               contrastive_weight=1.0, negative_weight=3.0),
    "bce_contrastive_hn4_e3": dict(loss="bce", epochs=3, init_scale=0.05, init_bias=17.0,
                                   contrastive_weight=1.0, negative_weight=3.0, hard_negatives=4,
                                   hard_negative_min_cos=0.7),
    "bce_contrastive_lr3e-5_e3": dict(loss="bce", epochs=3, init_scale=0.05, init_bias=17.0, lr=3e-5,
                                      contrastive_weight=1.0, negative_weight=3.0),
    "default": dict(),  # raycache train exactly as released
}


def extra_training_pairs(extra: pd.DataFrame, held_out: set[str]) -> pd.DataFrame:
    """The rows of ``extra`` (more labelled pairs over related prompts) that may train without
    touching the held-out parts: neither prompt is held out, nor shares a positive (label-1) edge of
    ``extra`` with a held-out prompt (so no answer group reaches the test through a neighbour)."""
    pos = extra[extra["label"] >= 0.5]
    near = set(held_out)
    for a, b in zip(pos["prompt_a"], pos["prompt_b"]):
        if a in held_out:
            near.add(b)
        if b in held_out:
            near.add(a)
    keep = ~(extra["prompt_a"].isin(near) | extra["prompt_b"].isin(near))
    return extra[keep.to_numpy()]


def split_data(pairs_path: Path, stream_path: Path, seed: int, out: Path,
               extra_pairs_path: Path | None = None) -> dict:
    """Write train/test pair files and calib/test streams, question-disjoint by pair component;
    with ``extra_pairs_path``, its pairs clear of the held-out prompts join the training pairs
    (:func:`extra_training_pairs`)."""
    from raycache.data import read_pairs, read_stream, write_table
    from raycache.splits import assign_components, pair_components

    pairs = read_pairs(str(pairs_path))
    stream = read_stream(str(stream_path)) if stream_path else None
    comps = pair_components(pairs["prompt_a"].tolist(), pairs["prompt_b"].tolist())
    part = assign_components(comps, [0.6, 0.2, 0.2], seed=seed)  # train, calibration, test
    part_of_prompt = {}
    for a, b, p in zip(pairs["prompt_a"], pairs["prompt_b"], part):
        part_of_prompt[a] = part_of_prompt[b] = int(p)
    if extra_pairs_path is not None:
        held_out = {q for q, p in part_of_prompt.items() if p != 0}
        extra = extra_training_pairs(read_pairs(str(extra_pairs_path)), held_out)
        train = pd.concat([pairs[part == 0], extra[list(pairs.columns)]], ignore_index=True)
        train = train.drop_duplicates(["prompt_a", "prompt_b"])
        pairs = pd.concat([train, pairs[part != 0]], ignore_index=True)
        part = np.concatenate([np.zeros(len(train), int), part[part != 0]])
        print(f"extra pairs: {len(extra)} of {extra_pairs_path} clear of the held-out prompts "
              f"(positive rate {extra['label'].mean():.3f})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if stream is None:  # pairs only (e.g. NQ-hard): AUC / AP, no operating points
        files = {"train_pairs": out / "train_pairs.jsonl", "test_pairs": out / "test_pairs.jsonl"}
        write_table(pairs[part == 0], str(files["train_pairs"]))
        write_table(pairs[part == 2], str(files["test_pairs"]))
        return {"files": {k: str(v) for k, v in files.items()},
                "sizes": {"train_pairs": int((part == 0).sum()), "test_pairs": int((part == 2).sum())}}
    stream_part = stream["prompt"].map(part_of_prompt)
    if stream_part.isna().any():
        raise SystemExit(f"{stream_path}: {int(stream_part.isna().sum())} prompts not in {pairs_path}")
    out.mkdir(parents=True, exist_ok=True)
    files = {"train_pairs": out / "train_pairs.jsonl", "test_pairs": out / "test_pairs.jsonl",
             "calib_stream": out / "calib_stream.jsonl", "test_stream": out / "test_stream.jsonl"}
    write_table(pairs[part == 0], str(files["train_pairs"]))
    write_table(pairs[part == 2], str(files["test_pairs"]))
    write_table(stream[(stream_part == 1).to_numpy()], str(files["calib_stream"]))
    write_table(stream[(stream_part == 2).to_numpy()], str(files["test_stream"]))
    sizes = {"train_pairs": int((part == 0).sum()), "test_pairs": int((part == 2).sum()),
             "calib_arrivals": int((stream_part == 1).sum()), "test_arrivals": int((stream_part == 2).sum())}
    return {"files": {k: str(v) for k, v in files.items()}, "sizes": sizes}


def operating_points(calib: pd.DataFrame, calib_vectors: np.ndarray, test: pd.DataFrame,
                     test_vectors: np.ndarray) -> dict:
    """Per δ: the test figures at the threshold the plain rule picks on the calibration stream (the
    lowest whose false-hit rate there is ≤ δ), with the best threshold on the test stream as an upper
    bound and raycache calibrate's fixed-sequence choice beside them (``raycache.simulation``)."""
    from raycache.simulation import operating_point

    thresholds = [round(0.5 + 0.005 * i, 3) for i in range(100)]
    result = operating_point(calib, test, calib_vectors=calib_vectors, test_vectors=test_vectors,
                             deltas=DELTAS, thresholds=thresholds)
    out = {}
    for entry in result["deltas"]:
        chosen, best = entry["empirical"], entry["best_on_test"]
        out[f"{entry['delta']:g}"] = {
            "threshold": chosen["threshold"],
            "correct_hit_rate": chosen["correct_hit_rate"],
            "false_hit_rate": chosen["false_hit_rate"],
            "upper_bound_correct_hit_rate": best["correct_hit_rate"] if best else 0.0,
            "fixed_sequence": {k: entry["fixed_sequence"][k]
                               for k in ("threshold", "correct_hit_rate", "false_hit_rate")},
        }
    return out


def evaluate_model(model: str | None, data: dict, max_length: int) -> dict:
    from raycache.encoder import Encoder
    from raycache.evaluation import pair_similarities, similarity_metrics
    from raycache.data import read_pairs, read_stream

    enc = Encoder.load(model, max_length=max_length)
    test_pairs = read_pairs(data["files"]["test_pairs"])
    sims = pair_similarities(enc, test_pairs["prompt_a"].tolist(), test_pairs["prompt_b"].tolist())
    pm = similarity_metrics(sims, test_pairs["label"].to_numpy())
    if "calib_stream" not in data["files"]:
        return {"auc": pm["auc"], "ap": pm["average_precision"], "tpr_at_fpr": pm["tpr_at_fpr"],
                "operating_points": {}}
    calib = read_stream(data["files"]["calib_stream"])
    test = read_stream(data["files"]["test_stream"])
    ops = operating_points(calib, enc.encode(calib["prompt"].tolist()),
                           test, enc.encode(test["prompt"].tolist()))
    return {"auc": pm["auc"], "ap": pm["average_precision"], "tpr_at_fpr": pm["tpr_at_fpr"],
            "operating_points": ops}


def train_recipe(name: str, data: dict, out: Path, max_pairs: int | None) -> tuple[str, dict]:
    from raycache.config import TrainConfig
    from raycache.training.job import run

    overrides = RECIPES[name]
    cfg = TrainConfig(pairs=data["files"]["train_pairs"], out=str(out / name), max_pairs=max_pairs,
                      **overrides)
    summary = run(cfg)
    metrics = json.loads((out / name / "train_metrics.json").read_text())
    pairs_per_s = [e["pairs_per_s"] for e in metrics["epochs"]]
    return summary["model"], {"train_wall_s": summary["wall_s"], "epochs_run": metrics["epochs_run"],
                              "best_epoch": metrics["best_epoch"], "pairs_per_s": float(np.mean(pairs_per_s)),
                              "overrides": overrides}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=str(DATA / "pairs" / "qqp_dev.jsonl"))
    ap.add_argument("--stream", default=str(DATA / "streams" / "stream_qqp_dev.jsonl"),
                    help="stream of the pairs' prompts, or 'none' (pairs only: AUC / AP)")
    ap.add_argument("--recipes", default="base,bce_v0,default")
    ap.add_argument("--extra-train-pairs", default=None,
                    help="more labelled pairs for training only (e.g. nq_natural_dev.jsonl with NQ-hard): "
                         "rows touching a held-out prompt or its positive neighbours are dropped")
    ap.add_argument("--max-pairs", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/recipes")
    ap.add_argument("--reuse-models", action="store_true",
                    help="evaluate the models already trained under --out instead of training again")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = Path(args.out).resolve()
    data = split_data(Path(args.pairs), Path(args.stream) if args.stream != "none" else None, args.seed,
                      out / "data", Path(args.extra_train_pairs) if args.extra_train_pairs else None)
    print(f"split (question-disjoint): {data['sizes']}", flush=True)
    results_path = out / "recipes.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.recipes.split(","):
        t0 = time.time()
        info: dict = {}
        model = None
        if name != "base" and args.reuse_models and (out / name / "train_metrics.json").exists():
            model, info = str(out / name / "model"), dict(results.get(name, {}))
            info.pop("operating_points", None)
        elif name != "base":
            model, info = train_recipe(name, data, out, args.max_pairs)
        info |= evaluate_model(model, data, args.max_length)
        info["load_avg"] = os.getloadavg()
        info["wall_s"] = time.time() - t0
        results[name] = info
        results_path.write_text(json.dumps({"data": data} | {k: v for k, v in results.items() if k != "data"},
                                           indent=2))
        print_row(name, info)
    return 0


def print_row(name: str, r: dict) -> None:
    ops = r["operating_points"]
    if not ops:
        print(f"| {name} | {r['auc']:.3f} / {r['ap']:.3f} | {r.get('pairs_per_s', float('nan')):.1f} "
              f"| {r['wall_s']:.0f} s | load {r['load_avg'][0]:.1f} |", flush=True)
        return
    cells = " | ".join(f"{ops[f'{d:g}']['correct_hit_rate']:.3f} / {ops[f'{d:g}']['false_hit_rate']:.3f}"
                       f" (≤{ops[f'{d:g}']['upper_bound_correct_hit_rate']:.3f})" for d in DELTAS)
    print(f"| {name} | {r['auc']:.3f} / {r['ap']:.3f} | {cells} | {r.get('pairs_per_s', float('nan')):.1f} "
          f"| {r['wall_s']:.0f} s | load {r['load_avg'][0]:.1f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
