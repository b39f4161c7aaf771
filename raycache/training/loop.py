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
from raycache.training.head import PairScorer, SimilarityHead
from raycache.training.losses import build_loss

MODEL_DIR = "model"
STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.json"
TRAIN_DATASET = "train"
PROGRESS_EVERY_S = 15.0
LOSS_POINTS_PER_EPOCH = 10  # rank 0's mean batch loss is recorded this often per epoch (for the plot)
SHUFFLE_BUFFER_ROWS = 4096  # rows in Ray Data's per-worker shuffle buffer

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


def _set_threads(cfg: TrainConfig, device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_num_threads(cfg.torch_threads or max(1, int(round(cfg.cpus_per_worker))))


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
    """This rank's equal share of a reshuffled (per epoch) in-memory table, in batches."""
    n = len(rows["label"])
    order = np.random.default_rng(cfg.seed + epoch).permutation(n)
    mine = order[rank::world][: n // world]
    a, b, y = rows["prompt_a"], rows["prompt_b"], np.asarray(rows["label"], dtype=np.float32)
    for start in range(0, len(mine), cfg.batch_size):
        idx = mine[start:start + cfg.batch_size]
        yield [a[i] for i in idx], [b[i] for i in idx], y[idx]


def _ray_data_batches(cfg: TrainConfig, epoch: int) -> Iterator[Batch]:
    """This worker's Ray Data shard for one epoch, locally shuffled, in batches."""
    import ray.train

    shard = ray.train.get_dataset_shard(TRAIN_DATASET)
    for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                    local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                                    local_shuffle_seed=cfg.seed + epoch):
        yield ([str(t) for t in batch["prompt_a"]], [str(t) for t in batch["prompt_b"]],
               np.asarray(batch["label"], dtype=np.float32))


def validate(scorer: PairScorer, val: dict[str, list], batch_size: int) -> dict[str, float]:
    """ROC-AUC and average precision of the cosine on labelled pairs (labels binarised at 0.5)."""
    from raycache.evaluation import pair_similarities, similarity_metrics

    sims = pair_similarities(scorer.encoder, val["prompt_a"], val["prompt_b"], batch_size=batch_size)
    metrics = similarity_metrics(sims, np.asarray(val["label"], dtype=np.float64))
    return {"auc": metrics["auc"], "ap": metrics["average_precision"]}


def _save_checkpoint(out_dir: Path, scorer: PairScorer, optimizer, scheduler, epoch: int,
                     history: dict) -> None:
    model_dir = out_dir / MODEL_DIR
    scorer.encoder.save(model_dir)
    scorer.head.save(model_dir)
    torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, out_dir / STATE_FILE)
    (out_dir / HISTORY_FILE).write_text(json.dumps(history, indent=2))


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
        _set_threads(cfg, self.device)
        torch.manual_seed(cfg.seed)

        self.scorer = _build_scorer(cfg, self.device, checkpoint_dir)
        self.model = ray.train.torch.prepare_model(self.scorer)
        self.optimizer = _optimizer(self.scorer, cfg)
        self.steps_per_epoch = steps_per_epoch(n_train, self.world, cfg.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_warmup_decay(self.steps_per_epoch * cfg.epochs, cfg.warmup_ratio))
        self.loss_fn = build_loss(cfg.loss, cfg.sld_eps)
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
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = self.model(prompts_a, prompts_b)
            loss = self.loss_fn(logits.float(), targets)
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
            if self.rank == 0 and now - last_print >= PROGRESS_EVERY_S:
                last_print = now
                logger.info("epoch %d/%d step %d/%d loss %.4f %.1f pairs/s", epoch, cfg.epochs, step,
                            self.steps_per_epoch, loss_sum / n_pairs,
                            self.world * n_pairs / (now - t0))
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
        run.history["base"] = validate(run.scorer, val_rows, cfg.encoder.batch_size)
        logger.info("base model: val AUC %.4f AP %.4f", run.history["base"]["auc"],
                    run.history["base"]["ap"])

    for epoch in range(run.last_epoch + 1, cfg.epochs + 1):
        batches = (in_memory_batches(train_rows, cfg, epoch, run.rank, run.world)
                   if train_rows is not None else _ray_data_batches(cfg, epoch))
        record = run.train_epoch(epoch, batches)
        if run.rank == 0 and val_rows is not None:
            start = time.perf_counter()
            val = validate(run.scorer, val_rows, cfg.encoder.batch_size)
            record.update(val_auc=val["auc"], val_ap=val["ap"], val_s=time.perf_counter() - start)
        if run.rank == 0:
            logger.info("epoch %d/%d done: %s", epoch, cfg.epochs, ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        run.report(epoch, record)
