"""Benchmark 4: decision quality on real data (QQP dev pairs and stream from ../shared/data).

Questions are split by connected component of the pair graph, so the train, calibration and test
parts share no question (and no duplicate group). Then:

* fine-tune the encoder with ``raycache.training.job.run`` on train pairs (human QQP duplicate
  labels as the teacher's labels; ``--train-pairs`` pairs, ``--epochs`` epochs);
* ROC-AUC of cosine similarity on the test pairs, base vs fine-tuned;
* replay the test part of the stream (arrival order, unlimited cache, hit = most similar cached
  prompt passes the rule, correct = same group; rates per arrival) under each decision rule:
  GPTCache's default (``SearchDistanceEvaluation`` at ``similarity_threshold`` 0.8 = cosine >= 0.6
  on unit vectors), a static threshold tuned on the calibration stream (the highest hit rate with
  false-hit rate <= δ there), and raycache's ``CalibratedThreshold`` fitted on the calibration pairs
  (δ, 95% confidence) with the base and the fine-tuned encoder. The best threshold picked on the
  test stream itself is shown as an upper bound, not as a method.

    python -m bench.decision_quality            # ~10 min on 2 busy cores
    python -m bench.decision_quality --quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from bench.common import markdown_table, read_jsonl, setup_env, shared_data_dir, write_results

GPTCACHE_DEFAULT_COSINE = 0.6  # 4.0 - squared L2 >= 0.8 * 4.0  <=>  2 + 2 cos >= 3.2
THRESHOLD_GRID = np.round(np.arange(0.30, 1.0001, 0.005), 3)
LOOSER_DELTAS = (0.05, 0.1, 0.15, 0.2, 0.3)  # tried when the calibrated policy cannot meet δ


# ----------------------------------------------------------------------------- question split
def question_components(pairs: pd.DataFrame) -> dict[str, int]:
    """question -> id of its connected component in the pair graph (any label)."""
    from raycache.splits import UnionFind

    sets = UnionFind()
    for a, b in zip(pairs["prompt_a"], pairs["prompt_b"]):
        sets.union(a, b)
    roots: dict = {}
    return {q: roots.setdefault(sets.find(q), len(roots)) for q in sets}


def split_questions(pairs: pd.DataFrame, n_cal: int, n_test: int, seed: int = 0) -> dict[str, str]:
    """question -> 'calibration' | 'test' | 'train': whole components, about ``n_cal`` and ``n_test``
    questions for calibration and test, the rest for training."""
    component = question_components(pairs)
    sizes = np.bincount(list(component.values()))
    order = np.random.default_rng(seed).permutation(len(sizes))
    part_of = np.full(len(sizes), "train", dtype=object)
    filled = {"calibration": 0, "test": 0}
    wanted = {"calibration": n_cal, "test": n_test}
    for c in order:
        for part in ("test", "calibration"):
            if filled[part] < wanted[part]:
                part_of[c], filled[part] = part, filled[part] + sizes[c]
                break
        else:
            break
    return {q: part_of[c] for q, c in component.items()}


def pairs_in(pairs: pd.DataFrame, part_of: dict[str, str], part: str) -> pd.DataFrame:
    keep = [part_of[a] == part for a in pairs["prompt_a"]]  # both ends share a component
    return pairs[keep].reset_index(drop=True)


# ----------------------------------------------------------------------------- scoring
def stream_sweep(stream: pd.DataFrame, vectors: np.ndarray, thresholds: Sequence[float]) -> dict[float, dict]:
    """Static-threshold replay of ``stream`` (prompt, group) for every threshold -> metrics."""
    from raycache.simulation.metrics import replay_metrics
    from raycache.simulation.offline import ReplayStream, replay_vectorized

    replay = ReplayStream.from_frame(stream, vectors)
    decided = replay_vectorized(replay, sorted(set(float(t) for t in thresholds)), exact_tier=True)
    return {t: replay_metrics(stream, d, threshold=t) for t, (d, _) in decided.items() if d is not None}


def best_under(sweep: dict[float, dict], delta: float) -> dict | None:
    from raycache.simulation.metrics import headline

    return headline(list(sweep.values()), delta)


def pair_auc(vectors: dict[str, np.ndarray], pairs: pd.DataFrame) -> float:
    from sklearn.metrics import roc_auc_score

    sims = [float(vectors[a] @ vectors[b]) for a, b in zip(pairs["prompt_a"], pairs["prompt_b"])]
    return float(roc_auc_score(pairs["label"].to_numpy() >= 0.5, sims))


def calibrated_policy(vectors: dict[str, np.ndarray], pairs: pd.DataFrame, delta: float):
    """raycache's CalibratedThreshold on the calibration pairs: the bound (95%) is on the share of
    *pairs at or above the threshold* that cannot share a response, i.e. on wrong hits among hits."""
    import warnings

    from raycache.cache.policy import CalibratedThreshold

    sims = [float(vectors[a] @ vectors[b]) for a, b in zip(pairs["prompt_a"], pairs["prompt_b"])]
    with warnings.catch_warnings():  # an unqualified policy is reported in the table instead
        warnings.simplefilter("ignore", RuntimeWarning)
        return CalibratedThreshold.fit(sims, pairs["label"].to_numpy(float), delta, confidence=0.95)


def embed(model: str | None, texts: list[str]) -> dict[str, np.ndarray]:
    from raycache.encoder import Encoder

    encoder = Encoder.load(model, device="cpu")
    return dict(zip(texts, encoder.encode(texts, batch_size=64)))


def fine_tune(train: pd.DataFrame, out_dir: Path, epochs: int, seed: int) -> Path:
    """Fine-tune the default encoder on ``train`` with raycache's Ray Train job; returns model/."""
    import ray

    from raycache.config import TrainConfig
    from raycache.data import write_table
    from raycache.training.job import run as train_run

    pairs_path = out_dir / "train_pairs.jsonl"
    write_table(train[["prompt_a", "prompt_b", "label"]], str(pairs_path))
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.environ["RAY_TMPDIR"])
    try:
        summary = train_run(TrainConfig(pairs=str(pairs_path), out=str(out_dir / "train"), epochs=epochs,
                                        use_ray_data=False, seed=seed))
    finally:
        ray.shutdown()
    return Path(summary.get("model") or out_dir / "train" / "model")


# ----------------------------------------------------------------------------- main
def evaluate(args: argparse.Namespace) -> dict:
    data = shared_data_dir()
    pairs = pd.DataFrame(read_jsonl(data / "pairs" / "qqp_dev.jsonl"))
    stream_all = pd.DataFrame(read_jsonl(data / "streams" / "stream_qqp_dev.jsonl"))
    part_of = split_questions(pairs, args.cal_questions, args.test_questions, args.seed)
    parts = {p: pairs_in(pairs, part_of, p) for p in ("train", "calibration", "test")}
    train = parts["train"].sample(n=min(args.train_pairs, len(parts["train"])), random_state=args.seed)
    streams = {p: stream_all[stream_all["prompt"].map(part_of) == p].reset_index(drop=True)
               for p in ("calibration", "test")}
    texts = sorted(set(streams["calibration"]["prompt"]) | set(streams["test"]["prompt"])
                   | set(parts["calibration"]["prompt_a"]) | set(parts["calibration"]["prompt_b"])
                   | set(parts["test"]["prompt_a"]) | set(parts["test"]["prompt_b"]))
    out: dict = {"split": {p: {"pairs": len(df), "questions": int(sum(v == p for v in part_of.values()))}
                           for p, df in parts.items()},
                 "train_pairs_used": len(train), "epochs": args.epochs, "delta": args.delta,
                 "test_stream_arrivals": len(streams["test"]),
                 "test_stream_oracle_hit_rate": float(streams["test"]["group"].duplicated().mean()),
                 "timings_s": {}}
    with tempfile.TemporaryDirectory(prefix="rcb-quality-") as tmp:
        start = time.perf_counter()
        tuned_dir = fine_tune(train, Path(tmp), args.epochs, args.seed)
        out["timings_s"]["fine_tune"] = time.perf_counter() - start
        models = {"base": None, "fine-tuned": str(tuned_dir)}
        results: dict = {}
        for name, model in models.items():
            start = time.perf_counter()
            vecs = embed(model, texts)
            out["timings_s"][f"embed_{name}"] = time.perf_counter() - start
            stream_vecs = {p: np.stack([vecs[q] for q in s["prompt"]]) for p, s in streams.items()}
            policy = calibrated_policy(vecs, parts["calibration"], args.delta)
            cal_sweep = stream_sweep(streams["calibration"], stream_vecs["calibration"], THRESHOLD_GRID)
            tuned = best_under(cal_sweep, args.delta)
            looser = next((p for p in (calibrated_policy(vecs, parts["calibration"], d) for d in LOOSER_DELTAS)
                           if p.qualified), None) if not policy.qualified else None
            rules = {"GPTCache default (cos >= 0.6)": GPTCACHE_DEFAULT_COSINE if name == "base" else None,
                     "static, tuned on calibration stream": tuned["threshold"] if tuned else None,
                     f"raycache CalibratedThreshold, δ={args.delta:g}": policy.threshold if policy.qualified else None}
            if looser is not None:
                rules[f"raycache CalibratedThreshold, δ={looser.delta:g} (smallest tried that qualifies)"] = \
                    looser.threshold
            chosen = [t for t in rules.values() if t is not None]
            test_sweep = stream_sweep(streams["test"], stream_vecs["test"], list(THRESHOLD_GRID) + chosen)
            results[name] = {
                "test_pair_auc": pair_auc(vecs, parts["test"]),
                "calibration_pair_auc": pair_auc(vecs, parts["calibration"]),
                "calibrated_policy": policy.describe(),
                "calibrated_policy_looser": looser.describe() if looser is not None else None,
                "rules": {rule: (test_sweep[float(t)] if t is not None else None) for rule, t in rules.items()},
                "best_on_test_stream": best_under(test_sweep, args.delta),
            }
        out["models"] = results
    return out


def rows_for(out: dict) -> list[list]:
    delta = out["delta"]
    rows = []
    for model, res in out["models"].items():
        entries = [(rule, m) for rule, m in res["rules"].items()]
        best = res["best_on_test_stream"]
        entries.append(("(upper bound: best threshold on the test stream itself)", best))
        for rule, m in entries:
            if m is None:
                if rule.startswith("raycache CalibratedThreshold"):  # no threshold qualified: never hits
                    rows.append([rule, model, "none", 0.0, 0.0, 0.0, "-", "yes (never hits)"])
                continue
            ok = m["false_hit_rate"] <= delta + 1e-12
            rows.append([rule, model, m["threshold"], m["hit_rate"], m["false_hit_rate"], m["correct_hit_rate"],
                         m["precision"], "yes" if ok else "NO"])
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-pairs", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--cal-questions", type=int, default=2000)
    parser.add_argument("--test-questions", type=int, default=2000)
    parser.add_argument("--delta", type=float, default=0.02, help="false-hit rate target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="toy size: proves the code path, measures nothing")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_pairs, args.cal_questions, args.test_questions = 64, 150, 150
    setup_env()
    start = time.perf_counter()
    out = evaluate(args)
    out["wall_s"] = time.perf_counter() - start
    print(f"\nQQP dev, question-disjoint split {out['split']}; fine-tuned on {out['train_pairs_used']} train pairs "
          f"x {out['epochs']} epoch(s)\n")
    print(markdown_table(["model", "test-pair ROC-AUC", "calibration-pair ROC-AUC"],
                         [[m, r["test_pair_auc"], r["calibration_pair_auc"]] for m, r in out["models"].items()]))
    print(f"\nTest stream: {out['test_stream_arrivals']} arrivals (oracle hit rate "
          f"{out['test_stream_oracle_hit_rate']:.3f}); target false-hit rate <= {out['delta']}\n")
    print(markdown_table(["decision rule", "model", "cosine threshold", "hit rate", "false-hit rate",
                          "correct-hit rate", "precision of hits", f"false-hit <= {out['delta']}"],
                         rows_for(out)))
    path = write_results("decision_quality", out, args.out, quick=args.quick)
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
