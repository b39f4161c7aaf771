"""The main job: generate -> mine -> label -> train (BCE, SLD) -> evaluate -> simulate -> serve + live replay.

Each stage reads the previous stage's files under ``cfg.out`` and writes its own, so ``--from-stage``
reruns from any stage. The end is one report folder: ``report.md``, ``report.html`` (plots inline),
``metrics.json``, ``simulation.json``, the plots and the fine-tuned models. Every figure in the report
is read from files this run wrote.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Callable

from raycache.config import (EvaluateConfig, LabelConfig, MineConfig, PipelineConfig, ServeConfig,
                             SimulateConfig, TrainConfig)

logger = logging.getLogger(__name__)

STAGES = ("generate", "mine", "label", "train", "evaluate", "simulate", "live")


class Layout:
    """Where each stage writes inside the report folder."""

    def __init__(self, out: str | Path):
        self.out = Path(out).resolve()  # Serve replicas and Ray workers run in other directories
        self.data = self.out / "data"
        self.prompts_train = self.data / "prompts_train.jsonl"
        self.pairs_train = self.data / "pairs_train.jsonl"
        self.pairs_test = self.data / "pairs_test.jsonl"
        self.stream = self.data / "stream.jsonl"
        self.mined = self.out / "mined_pairs.parquet"
        self.labels = self.out / "labels"
        self.eval = self.out / "eval"
        self.sim = self.out / "simulation"
        self.live = self.out / "live"
        self.summary = self.out / "stages.json"

    def train_dir(self, loss: str) -> Path:
        return self.out / loss

    def model(self, loss: str) -> Path:
        return self.train_dir(loss) / "model"


def sizes(cfg: PipelineConfig) -> dict:
    """Workload and training sizes for a full or --quick run (2-CPU budgets: ~15 min / ~5 min)."""
    if cfg.quick:
        return {"n_train_pairs": 400, "n_test_pairs": 600, "n_arrivals": 1500, "max_train_pairs": 1200,
                "epochs": 1, "live_arrivals": 300, "k": 3, "random_per_prompt": 0.3}
    return {"n_train_pairs": 600, "n_test_pairs": 1500, "n_arrivals": 4000,
            "max_train_pairs": cfg.max_train_pairs, "epochs": cfg.epochs, "live_arrivals": 1000,
            "k": 4, "random_per_prompt": 0.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_generate(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    from raycache import workload
    from raycache.data import read_prompts, write_table

    paths = workload.write_default_dataset(
        lay.data, seed=cfg.generate.seed, n_train_pairs=n["n_train_pairs"],
        n_test_pairs=n["n_test_pairs"], n_arrivals=n["n_arrivals"])
    prompts = read_prompts(paths["prompts.jsonl"] if "prompts.jsonl" in paths else lay.data / "prompts.jsonl")
    write_table(prompts[prompts["split"] == "train"].reset_index(drop=True), lay.prompts_train)
    return {"prompts": len(prompts), "train_prompts": int((prompts["split"] == "train").sum()),
            "groups": int(prompts["group"].nunique())}


def stage_mine(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    from raycache import mining

    return mining.run(MineConfig(prompts=str(lay.prompts_train), out=str(lay.mined), encoder=cfg.encoder,
                                 k=n["k"], random_per_prompt=n["random_per_prompt"], seed=cfg.generate.seed))


def stage_label(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    from raycache.labeling import job

    return job.run(LabelConfig(pairs=str(lay.mined), out=str(lay.labels), teacher="reference"))


def stage_train(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    from raycache.training import job

    results = {}
    for loss in cfg.losses:
        results[loss] = job.run(TrainConfig(
            pairs=str(lay.labels), val_pairs=str(lay.pairs_train), out=str(lay.train_dir(loss)),
            encoder=cfg.encoder, loss=loss, epochs=n["epochs"], workers=cfg.workers,
            max_pairs=n["max_train_pairs"], seed=cfg.generate.seed))
    return results


def _models(cfg: PipelineConfig, lay: Layout) -> list[str]:
    return ["default"] + [str(lay.model(loss)) for loss in cfg.losses]


def stage_evaluate(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    from raycache import evaluation

    return evaluation.run(EvaluateConfig(pairs=str(lay.pairs_test), out=str(lay.eval),
                                         models=_models(cfg, lay), encoder=cfg.encoder))


def stage_simulate(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    from raycache import simulation

    return simulation.run(SimulateConfig(stream=str(lay.stream), out=str(lay.sim), models=_models(cfg, lay),
                                         encoder=cfg.encoder, cache=cfg.cache.model_copy(update={"capacity": None}),
                                         delta=cfg.delta))


def stage_live(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    """Serve the first fine-tuned model, replay the head of the stream against it over HTTP."""
    from raycache import simulation
    from raycache.data import read_stream, write_table
    from raycache.service import app

    best, best_path = _best_model(lay)
    sim = json.loads((lay.sim / "simulation.json").read_text()) if (lay.sim / "simulation.json").exists() else {}
    threshold = _headline(sim, best).get("threshold") or cfg.cache.threshold
    stream = read_stream(lay.stream).head(n["live_arrivals"])
    live_stream = lay.live / "stream_head.jsonl"
    write_table(stream, live_stream)
    port = _free_port()
    encoder = cfg.encoder.model_copy(update={"model": best_path})
    cache = cfg.cache.model_copy(update={"threshold": float(threshold), "policy": "static"})
    started = time.time()
    info = app.run(ServeConfig(encoder=encoder, cache=cache, port=port, blocking=False))
    startup_s = time.time() - started
    try:
        result = simulation.run(SimulateConfig(stream=str(live_stream), out=str(lay.live),
                                               endpoint=info.get("url", f"http://127.0.0.1:{port}"),
                                               threshold=float(threshold), delta=cfg.delta))
    finally:
        app.stop()
    return {"model": best, "threshold": float(threshold), "startup_s": round(startup_s, 1), **result}


def _best_model(lay: Layout) -> tuple[str, str | None]:
    """(display name, model folder or None for the base model) with the best test AUC."""
    metrics_path = lay.eval / "metrics.json"
    if not metrics_path.exists():
        return "base", None
    metrics = json.loads(metrics_path.read_text())
    name = max(metrics, key=lambda n: metrics[n]["auc"])
    return name, (None if name == "base" else metrics[name]["model"])


def _headline(sim: dict, model: str) -> dict:
    for name, entry in (sim.get("models") or {}).items():
        if name == model:
            return entry.get("headline", {}) or {}
    return {}


STAGE_FUNCS: dict[str, Callable] = {
    "generate": stage_generate, "mine": stage_mine, "label": stage_label, "train": stage_train,
    "evaluate": stage_evaluate, "simulate": stage_simulate, "live": stage_live,
}


def run(cfg: PipelineConfig) -> dict:
    """Run the stages from ``cfg.from_stage`` (default: all), then write the report."""
    import ray

    if cfg.from_stage is not None and cfg.from_stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.from_stage!r}; expected one of {', '.join(STAGES)}")
    lay = Layout(cfg.out)
    lay.out.mkdir(parents=True, exist_ok=True)
    n = sizes(cfg)
    done = json.loads(lay.summary.read_text()) if lay.summary.exists() else {}
    first = STAGES.index(cfg.from_stage) if cfg.from_stage else 0
    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)
    t0 = time.time()
    for stage in STAGES[first:]:
        logger.info("pipeline: stage %s", stage)
        start = time.time()
        result = STAGE_FUNCS[stage](cfg, lay, n)
        done[stage] = {"seconds": round(time.time() - start, 1), "result": result}
        lay.summary.write_text(json.dumps(done, indent=2, default=str))
    from raycache.report import write_report

    report = write_report(lay, done, cfg, total_s=time.time() - t0)
    return {"out": str(lay.out), "report": str(report), "seconds": round(time.time() - t0, 1)}
