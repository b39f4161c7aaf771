"""The per-worker training function run by Ray Train's ``TorchTrainer`` (Train V2 API).

Every worker builds Encoder + SimilarityHead (from the latest checkpoint when there is one, which
is how both ``--resume`` and a restart after a lost worker continue), wraps it with
``ray.train.torch.prepare_model`` (DDP over gloo on CPU, NCCL on GPU), and trains on its shard of
the pairs: from Ray Data (``get_dataset_shard("train")``) or from an in-memory table passed in
``loop_config``. After each epoch rank 0 measures validation ROC-AUC / AP of the cosine on the
held-out pairs and writes a checkpoint: ``model/`` (an Encoder folder with
``similarity_head.json``), ``training_state.pt`` (optimizer, scheduler, epoch) and
``history.json`` (per-epoch metrics so far).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from raycache.config import TrainConfig
from raycache.io import write_text_atomic
from raycache.progress import report_line
from raycache.training.head import PairScorer, SimilarityHead
from raycache.training.losses import InBatchContrastiveLoss, build_loss

MODEL_DIR = "model"
STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.json"
TRAIN_DATASET = "train"
PROGRESS_EVERY_S = 15.0
LOSS_POINTS_PER_EPOCH = 10  # rank 0's mean batch loss is recorded this often per epoch (for the plot)
SHUFFLE_BUFFER_ROWS = 4096  # rows in Ray Data's per-worker shuffle buffer
BUCKET_WINDOW_BATCHES = 32  # length bucketing sorts windows of this many batches

logger = logging.getLogger(__name__)  # Ray Train routes worker logs to the driver

Batch = tuple[list[str], list[str], np.ndarray]  # prompts_a [B], prompts_b [B], labels [B]


def linear_warmup_decay(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: 0 -> 1 linearly over the warm-up, then 1 -> 0 at the end."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def steps_per_epoch(n_pairs: int, world_size: int, batch_size: int) -> int:
    """Optimizer steps per epoch when each of ``world_size`` workers gets n_pairs // world_size."""
    return max(1, math.ceil((n_pairs // world_size) / batch_size))


def worker_threads(cfg: TrainConfig, local_workers: int) -> int:
    """Torch threads per CPU worker: ``cfg.torch_threads``, else this node's cores shared evenly
    by its ``local_workers`` training workers (at least ``cpus_per_worker``): the training stage
    has the node to itself, since its input is materialised before the workers start."""
    if cfg.torch_threads:
        return cfg.torch_threads
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(round(cfg.cpus_per_worker)), cores // max(1, local_workers))


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: a CUDA device that supports it, or a CPU with AMX
    (``amx_bf16``). Elsewhere on CPU, torch's bf16 autocast runs emulated kernels (measured over
    10x slower than fp32 on such a machine), so fp32 it is."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def autocast_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast for the forward pass: per ``cfg.precision`` ('auto' = where native)."""
    if cfg.precision == "fp32":
        return False
    if cfg.precision == "bf16":
        return True
    return native_bf16(device)


def _set_threads(cfg: TrainConfig, device: torch.device, local_workers: int = 1) -> None:
    if device.type == "cpu":
        torch.set_num_threads(worker_threads(cfg, local_workers))


def _build_scorer(cfg: TrainConfig, device: torch.device, checkpoint_dir: Optional[Path]) -> PairScorer:
    from raycache.encoder import Encoder

    if checkpoint_dir is None:
        encoder = Encoder.load(cfg.encoder.model, device=str(device), max_length=cfg.encoder.max_length)
        head = SimilarityHead(cfg.init_scale, cfg.init_bias)
    else:
        model_dir = checkpoint_dir / MODEL_DIR
        encoder = Encoder.load(model_dir, device=str(device), max_length=cfg.encoder.max_length)
        head = SimilarityHead.load(model_dir)
    return PairScorer(encoder, head.to(device))


def _optimizer(scorer: PairScorer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW: encoder matrices with weight decay, encoder biases/LayerNorm without, head at head_lr."""
    decay, no_decay = [], []
    for p in scorer.encoder.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {"params": list(scorer.head.parameters()), "lr": cfg.head_lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups)


def in_memory_batches(rows: dict[str, list], cfg: TrainConfig, epoch: int, rank: int,
                       world: int) -> Iterator[Batch]:
    """This rank's equal share of a reshuffled (per epoch) in-memory table, in batches.

    With ``cfg.length_bucketing`` the shuffled share is cut into windows of
    ``BUCKET_WINDOW_BATCHES`` batches, each window sorted by pair length (characters of the longer
    prompt) before it is cut into batches, and the batches are then shuffled: a batch pads to
    prompts of similar length (less wasted compute on CPU) while the epoch still visits the
    pairs in a random order.
    """
    n = len(rows["label"])
    rng = np.random.default_rng(cfg.seed + epoch)
    order = rng.permutation(n)
    mine = order[rank::world][: n // world]
    a, b, y = rows["prompt_a"], rows["prompt_b"], np.asarray(rows["label"], dtype=np.float32)
    batches = [mine[start:start + cfg.batch_size] for start in range(0, len(mine), cfg.batch_size)]
    if cfg.length_bucketing and len(batches) > 1:
        length = np.fromiter((max(len(a[i]), len(b[i])) for i in mine), dtype=np.int64, count=len(mine))
        window = cfg.batch_size * BUCKET_WINDOW_BATCHES
        resorted = np.concatenate([
            mine[s:s + window][np.argsort(length[s:s + window], kind="stable")]
            for s in range(0, len(mine), window)])
        batches = [resorted[start:start + cfg.batch_size]
                   for start in range(0, len(resorted), cfg.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
    for idx in batches:
        yield [a[i] for i in idx], [b[i] for i in idx], y[idx]


def same_prompt_mask(prompts_a: list[str], prompts_b: list[str]) -> torch.Tensor:
    """[n, n] bool: entry (i, j) is True when b_j is the same text as b_i or a_i (so b_j is not a
    negative for pair i in the in-batch contrastive term)."""
    b = np.asarray(prompts_b, dtype=object)
    a = np.asarray(prompts_a, dtype=object)
    return torch.from_numpy((b[None, :] == b[:, None]) | (b[None, :] == a[:, None]))


def progress_line(text: str) -> None:
    """One progress line on stdout, which Ray forwards from the worker to the driver's terminal."""
    print(f"[raycache] {text}", flush=True)


def _ray_data_batches(cfg: TrainConfig, epoch: int) -> Iterator[Batch]:
    """This worker's Ray Data shard for one epoch, locally shuffled, in batches."""
    import ray.train

    shard = ray.train.get_dataset_shard(TRAIN_DATASET)
    for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                    local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                                    local_shuffle_seed=cfg.seed + epoch):
        yield ([str(t) for t in batch["prompt_a"]], [str(t) for t in batch["prompt_b"]],
               np.asarray(batch["label"], dtype=np.float32))


def validate(scorer: PairScorer, val: dict[str, list], batch_size: int,
             delta: float = 0.02) -> dict[str, float]:
    """Validation figures of the cosine on labelled pairs (labels binarised at 0.5).

    ``auc``, ``ap``; ``tpr_at_fpr``: mean TPR at FPR 1%, 2% and 5% (the high-similarity end of
    the ROC curve); ``hit_at_fh``: the correct-hit rate at false-hit ≤ ``delta`` when every
    validation prompt is looked up against all the others (groups = components of the positive
    pairs; :func:`raycache.evaluation.retrieval_operating_point`).
    """
    from raycache.evaluation import retrieval_operating_point, similarity_metrics
    from raycache.splits import prompt_groups

    prompts, groups = prompt_groups(val["prompt_a"], val["prompt_b"], val["label"])
    vectors = scorer.encoder.encode(prompts, batch_size=batch_size)
    position = {p: i for i, p in enumerate(prompts)}
    ia = np.fromiter((position[str(p)] for p in val["prompt_a"]), dtype=np.int64)
    ib = np.fromiter((position[str(p)] for p in val["prompt_b"]), dtype=np.int64)
    sims = np.einsum("ij,ij->i", vectors[ia], vectors[ib])
    metrics = similarity_metrics(sims, np.asarray(val["label"], dtype=np.float64))
    retrieval = retrieval_operating_point(vectors, groups, deltas=(delta,))[f"{delta:g}"]
    return {"auc": metrics["auc"], "ap": metrics["average_precision"],
            "tpr_at_fpr": float(np.mean(list(metrics["tpr_at_fpr"].values()))),
            "hit_at_fh": retrieval["correct_hit_rate"], "hit_at_fh_threshold": retrieval["threshold"]}


SELECT_KEYS = {"hit_at_fh": "val_hit_at_fh", "tpr_at_fpr": "val_tpr_at_fpr", "auc": "val_auc"}


def selection_score(record: dict[str, Any], cfg: TrainConfig) -> float:
    """The figure checkpoints are chosen and early stopping is decided by (higher is better);
    ties broken by validation AUC."""
    return float(record.get(SELECT_KEYS[cfg.select_metric], float("-inf"))) + 1e-6 * float(
        record.get("val_auc", 0.0))


def _save_checkpoint(out_dir: Path, scorer: PairScorer, optimizer, scheduler, epoch: int,
                     history: dict) -> None:
    model_dir = out_dir / MODEL_DIR
    scorer.encoder.save(model_dir)
    scorer.head.save(model_dir)
    torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, out_dir / STATE_FILE)
    write_text_atomic(out_dir / HISTORY_FILE, json.dumps(history, indent=2))


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all workers (identity when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class _WorkerRun:
    """One worker's training state: model (DDP-wrapped when distributed), optimizer, schedule, history."""

    def __init__(self, cfg: TrainConfig, n_train: int, checkpoint_dir: Optional[Path]):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.cfg = cfg
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        _set_threads(cfg, self.device, ctx.get_local_world_size())
        self.bf16 = autocast_bf16(cfg, self.device)
        torch.manual_seed(cfg.seed)

        self.scorer = _build_scorer(cfg, self.device, checkpoint_dir)
        self.model = ray.train.torch.prepare_model(self.scorer)
        self.optimizer = _optimizer(self.scorer, cfg)
        self.steps_per_epoch = steps_per_epoch(n_train, self.world, cfg.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_warmup_decay(self.steps_per_epoch * cfg.epochs, cfg.warmup_ratio))
        self.loss_fn = build_loss(cfg.loss, cfg.sld_eps, cfg.negative_weight)
        self.contrastive = (InBatchContrastiveLoss(cfg.contrastive_scale)
                            if cfg.contrastive_weight > 0 else None)
        self.history: dict[str, Any] = {"base": None, "epochs": [], "loss_curve": [],
                                        "resumed_from_epochs": []}
        self.last_epoch = 0
        if checkpoint_dir is not None:
            state = torch.load(checkpoint_dir / STATE_FILE, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.last_epoch = int(state["epoch"])
            self.history = json.loads((checkpoint_dir / HISTORY_FILE).read_text())
            self.history["resumed_from_epochs"].append(self.last_epoch)

    def train_epoch(self, epoch: int, batches: Iterator[Batch]) -> dict[str, Any]:
        """One pass over this worker's batches -> the epoch's record (loss, pairs/s, head)."""
        cfg, device = self.cfg, self.device
        encoder_params = list(self.scorer.encoder.parameters())
        curve_every = max(1, self.steps_per_epoch // LOSS_POINTS_PER_EPOCH)
        self.model.train()
        t0 = last_print = time.perf_counter()
        loss_sum, n_pairs, step = 0.0, 0, 0
        segment_sum, segment_steps = 0.0, 0
        for prompts_a, prompts_b, labels in batches:
            targets = torch.from_numpy(labels).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits, emb_a, emb_b = self.model(prompts_a, prompts_b, return_embeddings=True)
            loss = self.loss_fn(logits.float(), targets)
            if self.contrastive is not None:
                loss = loss + cfg.contrastive_weight * self.contrastive(
                    emb_a, emb_b, targets, same_prompt_mask(prompts_a, prompts_b).to(device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Clip the encoder only: the head's two scalars have their own lr and would
            # otherwise dominate the norm and shrink the encoder's step.
            torch.nn.utils.clip_grad_norm_(encoder_params, cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()

            step += 1
            batch_loss = float(loss.detach())
            n_pairs += len(labels)
            loss_sum += batch_loss * len(labels)
            segment_sum, segment_steps = segment_sum + batch_loss, segment_steps + 1
            if segment_steps == curve_every or step == self.steps_per_epoch:
                # x = epochs done (fractional), y = this worker's mean batch loss
                self.history["loss_curve"].append(
                    [epoch - 1 + step / self.steps_per_epoch, segment_sum / segment_steps])
                segment_sum, segment_steps = 0.0, 0
            now = time.perf_counter()
            if self.rank == 0 and (now - last_print >= PROGRESS_EVERY_S or step == 1):
                last_print = now
                rate = self.world * n_pairs / (now - t0)
                per_epoch = self.steps_per_epoch * self.world * cfg.batch_size
                report_line(f"train:{cfg.loss}", (epoch - 1) * per_epoch + self.world * n_pairs,
                            per_epoch * cfg.epochs, epoch=f"{epoch}/{cfg.epochs}",
                            loss=round(loss_sum / n_pairs, 4), pairs_s=round(rate, 1))
        loss_sum, n_total = _all_reduce_sum([loss_sum, float(n_pairs)], device)
        train_s = time.perf_counter() - t0
        return {
            "epoch": epoch,
            "train_loss": loss_sum / max(n_total, 1.0),
            "pairs": int(n_total),
            "pairs_per_s": n_total / train_s,
            "train_s": train_s,
            **{f"head_{k}": v for k, v in self.scorer.head.as_dict().items()},
        }

    def report(self, epoch: int, record: dict[str, Any]) -> None:
        """ray.train.report on every worker; rank 0 attaches the checkpoint."""
        import ray.train

        name = f"epoch_{epoch:03d}"
        if self.rank != 0:
            ray.train.report(record, checkpoint=None, checkpoint_dir_name=name)
            return
        self.history["epochs"].append(record)
        with tempfile.TemporaryDirectory(prefix="raycache-ckpt-") as tmp:
            _save_checkpoint(Path(tmp), self.scorer, self.optimizer, self.scheduler, epoch,
                             self.history)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point.

    ``loop_config``: ``cfg`` (TrainConfig as a dict), ``n_train`` (pairs in the full training
    set), ``train_rows`` ({prompt_a, prompt_b, label} lists, or None to read the Ray Data shard)
    and ``val_rows`` (same layout, or None for no validation).
    """
    import ray.train

    cfg = TrainConfig.model_validate(loop_config["cfg"])
    train_rows, val_rows = loop_config.get("train_rows"), loop_config.get("val_rows")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        run = _WorkerRun(cfg, loop_config["n_train"], None)
    else:
        with checkpoint.as_directory() as ckpt_dir:
            run = _WorkerRun(cfg, loop_config["n_train"], Path(ckpt_dir))
        if run.rank == 0:
            logger.info("continuing from the checkpoint of epoch %d", run.last_epoch)

    if run.rank == 0 and val_rows is not None and checkpoint is None:
        run.history["base"] = validate(run.scorer, val_rows, cfg.encoder.batch_size, cfg.select_delta)
        progress_line("base model: val " + _describe(run.history["base"]))

    best = max((selection_score(r, cfg) for r in run.history["epochs"]), default=float("-inf"))
    stale = 0
    for epoch in range(run.last_epoch + 1, cfg.epochs + 1):
        batches = (in_memory_batches(train_rows, cfg, epoch, run.rank, run.world)
                   if train_rows is not None else _ray_data_batches(cfg, epoch))
        record = run.train_epoch(epoch, batches)
        stop = 0.0
        if run.rank == 0 and val_rows is not None:
            start = time.perf_counter()
            val = validate(run.scorer, val_rows, cfg.encoder.batch_size, cfg.select_delta)
            record.update({f"val_{k}": v for k, v in val.items()}, val_s=time.perf_counter() - start)
            record["val_select"] = score = selection_score(record, cfg)
            stale = 0 if score > best else stale + 1
            best = max(best, score)
            if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience and epoch < cfg.epochs:
                stop = 1.0
        if run.rank == 0:
            progress_line(f"epoch {epoch}/{cfg.epochs} done: loss {record['train_loss']:.4f} "
                          f"{record['pairs_per_s']:.1f} pairs/s"
                          + (f", val {_describe({k[4:]: v for k, v in record.items() if k.startswith('val_')})}"
                             if val_rows is not None else ""))
        run.report(epoch, record)
        if _all_reduce_sum([stop], run.device)[0] > 0:
            if run.rank == 0:
                progress_line(f"early stop after epoch {epoch}: no better {cfg.select_metric} "
                              f"for {cfg.early_stopping_patience} epoch(s)")
            break


def _describe(val: dict[str, Any]) -> str:
    keys = ("auc", "ap", "tpr_at_fpr", "hit_at_fh")
    return " ".join(f"{k} {float(val[k]):.4f}" for k in keys if val.get(k) is not None)
