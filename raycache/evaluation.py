"""Evaluate how well cosine similarity predicts the teacher's label, for one or more models.

Metrics per model on a labelled pair file (soft labels binarised at 0.5): ROC-AUC, average precision,
best F1 and its threshold, precision/recall at given thresholds. Writes ``metrics.json`` and
``roc.png`` / ``pr.png`` with one curve per model, so base vs fine-tuned is one picture.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from raycache.config import EncoderConfig, EvaluateConfig
from raycache.io import write_text_atomic

logger = logging.getLogger(__name__)


def binarize(labels: Sequence[float]) -> np.ndarray:
    """Soft labels P(yes) in [0, 1] -> {0, 1} at 0.5 (ties count as positive)."""
    return (np.asarray(labels, dtype=np.float64) >= 0.5).astype(np.int64)


def pair_similarities(encoder, prompts_a: Sequence[str], prompts_b: Sequence[str],
                      batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Cosine similarity [n] of each pair; every distinct prompt is encoded once."""
    unique = pd.unique(pd.Series(list(prompts_a) + list(prompts_b), dtype=object))
    position = {p: i for i, p in enumerate(unique)}
    vecs = encoder.encode(list(unique), batch_size=batch_size, progress=progress)
    ia = np.fromiter((position[p] for p in prompts_a), dtype=np.int64, count=len(prompts_a))
    ib = np.fromiter((position[p] for p in prompts_b), dtype=np.int64, count=len(prompts_b))
    return np.einsum("ij,ij->i", vecs[ia], vecs[ib])


def similarity_metrics(similarities: np.ndarray, labels: Sequence[float],
                       thresholds: Sequence[float] = (0.7, 0.8, 0.9)) -> dict:
    """AUC, AP, best F1 (+ threshold) and precision/recall at ``thresholds`` for scores [n]."""
    y = binarize(labels)
    s = np.asarray(similarities, dtype=np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError("need both positive and negative pairs to compute ROC-AUC "
                         f"(got {int(y.sum())} positives of {len(y)})")
    precision, recall, pr_thresholds = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    best = int(np.argmax(f1[:-1])) if len(pr_thresholds) else 0
    at = {}
    for t in thresholds:
        predicted = s >= t
        tp = int((predicted & (y == 1)).sum())
        at[f"{t:g}"] = {
            "precision": tp / max(int(predicted.sum()), 1),
            "recall": tp / max(int(y.sum()), 1),
            "predicted_positive_rate": float(predicted.mean()),
        }
    return {
        "auc": float(roc_auc_score(y, s)),
        "average_precision": float(average_precision_score(y, s)),
        "best_f1": float(f1[best]),
        "best_f1_threshold": float(pr_thresholds[best]) if len(pr_thresholds) else float("nan"),
        "at_threshold": at,
        "tpr_at_fpr": tpr_at_fpr(s, y),
        "n_pairs": int(len(y)),
        "positive_rate": float(y.mean()),
    }


def tpr_at_fpr(similarities: np.ndarray, labels: Sequence[float],
               fprs: Sequence[float] = (0.01, 0.02, 0.05)) -> dict[str, float]:
    """{f"{fpr:g}": TPR} [for each FPR]: the share of positive pairs above the highest threshold at
    which at most that share of negative pairs is above it — the high-similarity end of the ROC
    curve, where a cache with a small false-hit budget sets its threshold."""
    y = binarize(labels)
    s = np.asarray(similarities, dtype=np.float64)
    neg = np.sort(s[y == 0])[::-1]
    pos = s[y == 1]
    out = {}
    for f in fprs:
        k = int(np.floor(f * len(neg)))  # negatives allowed strictly above the threshold
        cut = neg[k] if k < len(neg) else -np.inf  # threshold: the (k+1)-th highest negative
        out[f"{f:g}"] = float((pos > cut).mean()) if len(pos) else float("nan")
    return out


def retrieval_operating_point(vectors: np.ndarray, groups: Sequence[int],
                              deltas: Sequence[float] = (0.01, 0.02, 0.05)) -> dict[str, dict]:
    """Per-query hit rates when every prompt is looked up against all the others.

    ``vectors`` [m, dim] unit rows, ``groups`` [m] answer groups (equal = may share a response).
    Each prompt's nearest other prompt is its would-be cache hit; at threshold t it hits when that
    cosine is ≥ t, correctly when the neighbour is in its group. Returns, per δ, the threshold
    with the most correct hits among those whose false-hit rate (false hits / m) is ≤ δ:
    ``{f"{δ:g}": {"threshold", "correct_hit_rate", "false_hit_rate"}}``. A pair-file proxy of the
    stream figure (chosen on the same data, so an optimistic one: use it to compare checkpoints,
    not to report).
    """
    x = np.asarray(vectors, dtype=np.float32)
    g = np.asarray(groups)
    m = len(x)
    if m < 2:
        raise ValueError("need at least 2 prompts")
    best_sim = np.full(m, -np.inf, dtype=np.float32)
    best_j = np.zeros(m, dtype=np.int64)
    for start in range(0, m, 1024):
        block = x[start:start + 1024] @ x.T  # [b, m]
        rows = np.arange(start, min(start + 1024, m))
        block[rows - start, rows] = -np.inf
        best_j[rows] = np.argmax(block, axis=1)
        best_sim[rows] = block[rows - start, best_j[rows]]
    correct = g[best_j] == g
    order = np.argsort(-best_sim, kind="stable")
    cum_correct = np.cumsum(correct[order]) / m  # hits = the top k+1 queries by similarity
    cum_false = np.cumsum(~correct[order]) / m
    out = {}
    for d in deltas:
        ok = np.flatnonzero(cum_false <= d + 1e-12)
        if len(ok) == 0:
            out[f"{d:g}"] = {"threshold": None, "correct_hit_rate": 0.0, "false_hit_rate": 0.0}
            continue
        k = int(ok[np.argmax(cum_correct[ok])])
        out[f"{d:g}"] = {"threshold": float(best_sim[order[k]]),
                         "correct_hit_rate": float(cum_correct[k]), "false_hit_rate": float(cum_false[k])}
    return out


def model_label(model: str | None) -> str:
    """Display name: 'base' for the embedded default, else the folder's name."""
    from raycache.encoder import is_default_model

    if is_default_model(model):
        return "base"
    p = Path(model)
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def evaluate_models(pairs: pd.DataFrame, models: Sequence[str | None], encoder_cfg: EncoderConfig,
                    thresholds: Sequence[float] = (0.7, 0.8, 0.9), progress: bool = True
                    ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Metrics per model and the raw similarities per model (for plots)."""
    from raycache.encoder import Encoder

    labelled = pairs[pairs["label"].notna()] if "label" in pairs else pairs.iloc[0:0]
    if labelled.empty:
        raise ValueError("the pair file has no labelled rows (column 'label')")
    results, sims = {}, {}
    for model in models:
        name = model_label(model)
        if name in results:
            name = f"{name}_{len(results)}"
        encoder = Encoder.from_config(encoder_cfg, model)
        s = pair_similarities(encoder, labelled["prompt_a"].tolist(), labelled["prompt_b"].tolist(),
                              batch_size=encoder_cfg.batch_size, progress=progress)
        results[name] = {"model": model or "all-MiniLM-L6-v2 (embedded default)",
                         **similarity_metrics(s, labelled["label"].to_numpy(), thresholds)}
        sims[name] = s
        logger.info("%s: AUC %.4f AP %.4f", name, results[name]["auc"], results[name]["average_precision"])
    return results, sims


def plot_curves(sims: dict[str, np.ndarray], labels: Sequence[float], out_dir: Path) -> list[Path]:
    """Write roc.png and pr.png with one curve per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = binarize(labels)
    paths = []
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(5, 4.5), dpi=120)
        for name, s in sims.items():
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y, s)
                ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
            else:
                p, r, _ = precision_recall_curve(y, s)
                ax.plot(r, p, label=f"{name} (AP {average_precision_score(y, s):.3f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set(xlabel="false positive rate", ylabel="true positive rate",
                   title="ROC: cosine similarity vs teacher label")
        else:
            ax.axhline(y.mean(), color="k", ls=":", lw=0.8)
            ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
        ax.legend(loc="lower right" if kind == "roc" else "upper right", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{kind}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def run(cfg: EvaluateConfig, progress: bool = True) -> dict:
    """``raycache evaluate``: metrics.json + roc.png + pr.png in cfg.out (``progress``: encoding bars)."""
    from raycache.data import parse_columns, read_pairs

    pairs = read_pairs(cfg.pairs, columns=parse_columns(cfg.read.columns), skip_invalid=cfg.read.skip_invalid)
    models: list[str | None] = list(cfg.models) or [cfg.encoder.model]
    results, sims = evaluate_models(pairs, models, cfg.encoder, cfg.thresholds, progress=progress)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = pairs.loc[pairs["label"].notna(), "label"].to_numpy()
    plot_curves(sims, labels, out)
    write_text_atomic(out / "metrics.json", json.dumps(results, indent=2))
    return {name: {"auc": r["auc"], "average_precision": r["average_precision"]} for name, r in results.items()} | {
        "out": str(out)}
