"""``raycache train``: distillation fine-tuning of the encoder on Ray Train.

Reads the labelled pairs (Ray Data, or an in-memory table with ``use_ray_data=False``), runs
``train_loop_per_worker`` on a ``TorchTrainer`` (DDP; gloo on CPU, NCCL with ``--gpu``), keeps
per-epoch checkpoints in ``<out>/checkpoints`` (the best by validation AUC plus the latest, which a
restarted worker group or ``--resume`` continues from), then writes to ``cfg.out``:

- ``model/``: the best checkpoint's model folder (Encoder / transformers / sentence-transformers
  loadable, plus ``similarity_head.json``);
- ``train_metrics.json``: base and per-epoch loss, validation AUC / AP, pairs/s, wall times;
- ``training.png``: loss and validation AUC per epoch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from raycache.config import ConfigError, TrainConfig
from raycache.io import write_text_atomic
from raycache.training.loop import HISTORY_FILE, MODEL_DIR, TRAIN_DATASET, train_loop_per_worker

logger = logging.getLogger(__name__)

CHECKPOINT_RUN_NAME = "checkpoints"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of reported checkpoints
PAIR_COLUMNS = ["prompt_a", "prompt_b", "label"]


def labelled_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """The rows with a label, as prompt_a / prompt_b (str) and label (float64 in [0, 1])."""
    if "label" not in df.columns:
        raise ConfigError("the pair table has no 'label' column: label it first (raycache label)")
    out = df.loc[df["label"].notna(), PAIR_COLUMNS].reset_index(drop=True)
    out["prompt_a"] = out["prompt_a"].astype(str)
    out["prompt_b"] = out["prompt_b"].astype(str)
    out["label"] = out["label"].astype("float64")
    return out


def _as_rows(df: pd.DataFrame) -> dict[str, list]:
    return {c: df[c].tolist() for c in PAIR_COLUMNS}


def _read_table(path: str, cfg: TrainConfig, what: str) -> pd.DataFrame:
    from raycache.data import parse_columns, read_pairs

    df = labelled_pairs(read_pairs(path, columns=parse_columns(cfg.read.columns),
                                   skip_invalid=cfg.read.skip_invalid))
    if df.empty:
        raise ConfigError(f"{what} {path}: no labelled pairs")
    return df


def _check_validation(val: pd.DataFrame, what: str) -> dict[str, list]:
    positives = int((val["label"] >= 0.5).sum())
    if positives in (0, len(val)):
        raise ConfigError(f"{what}: AUC needs both positive and negative pairs "
                          f"(label >= 0.5: {positives} of {len(val)})")
    return _as_rows(val)


def _validation_rows(cfg: TrainConfig) -> Optional[dict[str, list]]:
    if cfg.val_pairs is None:
        return None
    return _check_validation(_read_table(cfg.val_pairs, cfg, "--val-pairs"), f"--val-pairs {cfg.val_pairs}")


def sample_pairs(df: pd.DataFrame, max_pairs: Optional[int], seed: int) -> pd.DataFrame:
    """At most ``max_pairs`` rows, a seeded uniform sample in the input's order (all rows if fewer)."""
    if max_pairs is None or len(df) <= max_pairs:
        return df
    return df.sample(n=max_pairs, random_state=seed).sort_index().reset_index(drop=True)


def hold_out_validation(df: pd.DataFrame, cfg: TrainConfig) -> tuple[pd.DataFrame, dict[str, list]]:
    """(training pairs, validation rows): ``cfg.val_fraction`` of the pairs held out by whole
    connected components of the pair graph, so no validation prompt is seen in training."""
    from raycache.splits import split_pairs

    try:
        train_idx, val_idx = split_pairs(df["prompt_a"].tolist(), df["prompt_b"].tolist(),
                                         cfg.val_fraction, seed=cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"--pairs {cfg.pairs}: {exc}") from None
    val = _check_validation(df.iloc[val_idx].reset_index(drop=True),
                            f"--pairs {cfg.pairs} (held-out validation part)")
    return df.iloc[train_idx].reset_index(drop=True), val


def with_hard_negatives(df: pd.DataFrame, cfg: TrainConfig) -> pd.DataFrame:
    """The training pairs plus ``cfg.hard_negatives`` mined negatives per prompt (see
    :mod:`raycache.training.hard_negatives`), embedded with the model being fine-tuned."""
    if not cfg.hard_negatives:
        return df
    from raycache.encoder import Encoder
    from raycache.training.hard_negatives import mine_hard_negatives

    start = time.time()
    encoder = Encoder.load(cfg.encoder.model, device=cfg.encoder.device, max_length=cfg.encoder.max_length)
    mined = mine_hard_negatives(df, lambda texts: encoder.encode(texts, batch_size=cfg.encoder.batch_size),
                                cfg.hard_negatives, cfg.hard_negative_min_cos)
    logger.info("hard negatives: %d pairs at cos >= %.2f added to %d training pairs (%.0f s)",
                len(mined), cfg.hard_negative_min_cos, len(df), time.time() - start)
    print(f"[raycache] hard negatives: {len(mined)} mined pairs (cos >= {cfg.hard_negative_min_cos:g}) "
          f"added to {len(df)} training pairs in {time.time() - start:.0f} s", flush=True)
    return pd.concat([df, mined], ignore_index=True)


def _training_data(cfg: TrainConfig, need_val: bool
                   ) -> tuple[int, Optional[dict[str, list]], dict[str, Any], Optional[dict[str, list]]]:
    """(number of training pairs, in-memory rows or None, Ray datasets for the trainer,
    held-out validation rows when ``need_val``)."""
    if not cfg.use_ray_data:
        df = _read_table(cfg.pairs, cfg, "--pairs")
        val = None
        if need_val:
            df, val = hold_out_validation(df, cfg)
        df = sample_pairs(df, cfg.max_pairs, cfg.seed)
        df = with_hard_negatives(df, cfg)
        return len(df), _as_rows(df), {}, val
    from raycache.data import parse_columns, read_dataset

    ds = read_dataset(cfg.pairs, "pairs", columns=parse_columns(cfg.read.columns),
                      skip_invalid=cfg.read.skip_invalid)
    ds = ds.map_batches(labelled_pairs, batch_format="pandas")
    val = None
    if need_val:
        # the split needs the whole pair graph: a driver-side pass over the (labelled) pairs
        df, val = hold_out_validation(ds.to_pandas(), cfg)
        import ray.data

        ds = ray.data.from_pandas(df)
    if cfg.max_pairs is not None:
        ds = ds.random_shuffle(seed=cfg.seed).limit(cfg.max_pairs)
    if cfg.hard_negatives:
        import ray.data

        # mining needs every training prompt at once: a driver-side pass
        ds = ray.data.from_pandas(with_hard_negatives(ds.to_pandas(), cfg))
    # Materialised once: the count is free, and epochs re-read nothing (so the training
    # workers may hold every CPU without starving a read task).
    ds = ds.materialize()
    n = ds.count()
    if n == 0:
        raise ConfigError(f"--pairs {cfg.pairs}: no labelled pairs")
    return n, None, {TRAIN_DATASET: ds}, val


def _prepare_checkpoint_dir(cfg: TrainConfig, out: Path) -> Path:
    """<out>/checkpoints: required to hold a run for --resume, cleared for a fresh run."""
    run_dir = out / CHECKPOINT_RUN_NAME
    if cfg.resume:
        if not (run_dir / SNAPSHOT_FILE).exists():
            raise ConfigError(f"--resume: no checkpoints to continue from in {run_dir}")
    elif run_dir.exists():
        logger.warning("fresh run: removing the previous run's checkpoints in %s "
                       "(pass --resume to continue it instead)", run_dir)
        shutil.rmtree(run_dir)
    return run_dir


def build_trainer(cfg: TrainConfig, out: Path, loop_config: dict[str, Any],
                  datasets: dict[str, Any], train_loop=train_loop_per_worker):
    """The TorchTrainer for this config (``train_loop`` replaceable for tests and debugging)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = ScalingConfig(
        num_workers=cfg.workers, use_gpu=cfg.gpu,
        resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})})
    has_val = loop_config.get("val_rows") is not None
    run_config = RunConfig(
        name=CHECKPOINT_RUN_NAME,
        storage_path=str(out),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        # num_to_keep=1 keeps the best by the selection figure; Ray Train never deletes the latest.
        checkpoint_config=CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute="val_select" if has_val else None,
            checkpoint_score_order="max"),
    )
    return TorchTrainer(train_loop, train_loop_config=loop_config,
                        torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
                        scaling_config=scaling, run_config=run_config, datasets=datasets)


def _best_checkpoint(result, has_val: bool):
    if has_val and result.best_checkpoints:
        return max(result.best_checkpoints, key=lambda cm: cm[1].get("val_select", float("-inf")))[0]
    return result.checkpoint


def _export_model(checkpoint, out: Path) -> Path:
    """Copy the checkpoint's model folder to <out>/model (replacing an older one atomically)."""
    target = out / MODEL_DIR
    staging = out / (MODEL_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with checkpoint.as_directory() as ckpt_dir:
        shutil.copytree(Path(ckpt_dir) / MODEL_DIR, staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def plot_training(history: dict, path: Path) -> Path:
    """training.png: train loss (per epoch, and rank 0's batches) and, per epoch (0 = base), validation
    ROC-AUC and correct-hit rate at false-hit ≤ δ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history["epochs"]]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    if history.get("loss_curve"):
        ax_loss.plot(*zip(*history["loss_curve"]), "-", color="tab:blue", alpha=0.6,
                     label="batches (rank 0)")
    ax_loss.plot(epochs, [r["train_loss"] for r in history["epochs"]], "o", color="tab:blue",
                 label="epoch mean")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    ax_loss.legend(fontsize=8)
    base = history.get("base") or {}
    curves = {"ROC-AUC": "auc", "correct-hit at false-hit ≤ δ": "hit_at_fh"}
    plotted = False
    for (label, key), color in zip(curves.items(), ("tab:green", "tab:red")):
        points = [(r["epoch"], r[f"val_{key}"]) for r in history["epochs"] if f"val_{key}" in r]
        if key in base:
            points.insert(0, (0, base[key]))
        if points:
            ax_auc.plot(*zip(*points), "o-", color=color, label=label)
            plotted = True
    if plotted:
        ax_auc.set(xlabel="epoch (0 = base model)", ylabel="validation figure",
                   title="Validation")
        ax_auc.legend(fontsize=8)
    else:
        ax_auc.text(0.5, 0.5, "no validation pairs", ha="center", va="center")
        ax_auc.set_axis_off()
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(cfg: TrainConfig, *, train_loop=train_loop_per_worker) -> dict:
    """Fine-tune, then write model/, train_metrics.json and training.png into cfg.out.

    ``train_loop`` replaces the per-worker function (tests inject failures with it).
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    start = time.time()
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    val_rows = _validation_rows(cfg)
    run_dir = _prepare_checkpoint_dir(cfg, out)
    if not ray.is_initialized():
        ray.init()
    n_train, train_rows, datasets, held_out = _training_data(cfg, need_val=val_rows is None)
    val_rows = val_rows if val_rows is not None else held_out
    if n_train < cfg.workers:
        raise ConfigError(f"{n_train} training pairs cannot be split over {cfg.workers} workers")
    loop_config = {"cfg": cfg.model_dump(), "n_train": n_train,
                   "train_rows": train_rows, "val_rows": val_rows}
    logger.info("training on %d pairs (%s), %d worker(s), %s, checkpoints in %s", n_train,
                "Ray Data" if datasets else "in memory", cfg.workers, "GPU" if cfg.gpu else "CPU",
                run_dir)
    result = build_trainer(cfg, out, loop_config, datasets, train_loop).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {run_dir}")

    best = _best_checkpoint(result, val_rows is not None)
    model_dir = _export_model(best, out)
    with result.checkpoint.as_directory() as latest_dir:
        history = json.loads((Path(latest_dir) / HISTORY_FILE).read_text())
    with best.as_directory() as best_dir:
        best_epoch = json.loads((Path(best_dir) / HISTORY_FILE).read_text())["epochs"][-1]
    metrics = {
        "loss": cfg.loss,
        "n_train_pairs": n_train,
        "n_val_pairs": len(val_rows["label"]) if val_rows else 0,
        "epochs_run": len(history["epochs"]),
        "workers": cfg.workers,
        "device": "gpu" if cfg.gpu else "cpu",
        "base": history["base"],
        "epochs": history["epochs"],
        "best_epoch": best_epoch["epoch"],
        "best_val_auc": best_epoch.get("val_auc"),
        "best_val_ap": best_epoch.get("val_ap"),
        "best_val_hit_at_fh": best_epoch.get("val_hit_at_fh"),
        "select_metric": cfg.select_metric,
        "validation": ("--val-pairs" if cfg.val_pairs else
                       f"held out from --pairs ({cfg.val_fraction:.0%}, question-disjoint)"),
        "resumed_from_epochs": history["resumed_from_epochs"],
        "wall_s": time.time() - start,
        "model": str(model_dir),
        "config": cfg.model_dump(),
    }
    write_text_atomic(out / "train_metrics.json", json.dumps(metrics, indent=2))
    plot_training(history, out / "training.png")
    logger.info("model (epoch %d) in %s; %.0f s", best_epoch["epoch"], model_dir, metrics["wall_s"])
    return {"model": str(model_dir), "best_epoch": best_epoch["epoch"],
            "best_val_auc": metrics["best_val_auc"], "best_val_ap": metrics["best_val_ap"],
            "best_val_hit_at_fh": metrics["best_val_hit_at_fh"],
            "base_val_hit_at_fh": (history["base"] or {}).get("hit_at_fh"),
            "base_val_auc": (history["base"] or {}).get("auc"), "wall_s": metrics["wall_s"],
            "out": str(out)}
