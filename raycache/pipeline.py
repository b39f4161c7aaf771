"""The main job: generate -> mine -> label -> train (BCE, SLD) -> evaluate -> simulate -> serve + live replay.

Each stage reads the previous stage's files under ``cfg.out`` and writes its own, so ``--from`` reruns
from any stage (and ``--to`` stops after one). The end is one report folder: ``report.md``,
``report.html`` (plots inline), ``metrics.json``, ``simulation.json``, the plots and the fine-tuned
models. Every figure in the report is read from files this run wrote.

What is fitted where (so that the figures are honest):

* the encoder is fine-tuned on pairs mined from the generator's **train** split and validated (per
  epoch, best checkpoint) on hard pairs of the **val** split;
* thresholds are chosen on ``stream_val.jsonl`` (val split), and the model to serve by validation;
* ROC-AUC, the offline replay and the live replay are read on the **test** split (its own entities
  and, by default, phrasing templates that neither training nor validation saw).

The driver shows one progress line per stage (:mod:`raycache.progress`) and ends with a summary
table; ``--verbose`` brings back Ray's and transformers' own output.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

from raycache import progress
from raycache.io import free_port, write_text_atomic
from raycache.config import (EvaluateConfig, LabelConfig, MineConfig, PipelineConfig, ServeConfig,
                             SimulateConfig, TrainConfig)

logger = logging.getLogger(__name__)

STAGES = ("generate", "mine", "label", "train", "evaluate", "simulate", "live")
#: unit of each stage's progress line
UNITS = {"generate": "files", "mine": "prompts", "label": "pairs", "train": "pairs", "evaluate": "models",
         "simulate": "models", "live": "arrivals"}

#: --quick: smaller defaults for what the config does not set explicitly
QUICK = {"n_train_pairs": 400, "n_test_pairs": 600, "n_arrivals": 1500, "n_val_pairs": 300,
         "n_val_arrivals": 1000, "max_train_pairs": 320, "epochs": 1, "live_arrivals": 300, "k": 3,
         "random_per_prompt": 0.3}
GENERATE_SIZES = ("n_train_pairs", "n_test_pairs", "n_arrivals", "n_val_pairs", "n_val_arrivals")
PIPELINE_SIZES = ("max_train_pairs", "epochs", "live_arrivals", "k", "random_per_prompt")


class Layout:
    """Where each stage writes inside the report folder."""

    def __init__(self, out: str | Path):
        self.out = Path(out).resolve()  # Serve replicas and Ray workers run in other directories
        self.data = self.out / "data"
        self.prompts_train = self.data / "prompts_train.jsonl"
        self.pairs_train = self.data / "pairs_train.jsonl"
        self.pairs_val = self.data / "pairs_val.jsonl"
        self.pairs_test = self.data / "pairs_test.jsonl"
        self.stream = self.data / "stream.jsonl"
        self.stream_val = self.data / "stream_val.jsonl"
        self.mined = self.out / "mined_pairs.parquet"
        self.labels = self.out / "labels"
        self.eval = self.out / "eval"
        self.sim = self.out / "simulation"
        self.sim_val = self.out / "simulation_val"
        self.live = self.out / "live"
        self.summary = self.out / "stages.json"

    def train_dir(self, loss: str) -> Path:
        return self.out / loss

    def model(self, loss: str) -> Path:
        return self.train_dir(loss) / "model"


def sizes(cfg: PipelineConfig) -> dict:
    """Workload and training sizes: the config's values; ``--quick`` only changes the ones the config
    does not set explicitly (a YAML key or a flag always wins)."""
    out = {}
    explicit_gen = cfg.generate.model_fields_set
    for key in GENERATE_SIZES:
        quick = cfg.quick and key not in explicit_gen
        out[key] = QUICK[key] if quick else getattr(cfg.generate, key)
    for key in PIPELINE_SIZES:
        quick = cfg.quick and key not in cfg.model_fields_set
        out[key] = QUICK[key] if quick else getattr(cfg, key)
    return out


# ----------------------------------------------------------------------------- stages


def stage_generate(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    from raycache import workload
    from raycache.data import read_prompts, write_table

    paths = workload.write_default_dataset(
        lay.data, seed=cfg.generate.seed, n_train_pairs=n["n_train_pairs"],
        n_test_pairs=n["n_test_pairs"], n_arrivals=n["n_arrivals"], n_val_pairs=n["n_val_pairs"],
        n_val_arrivals=n["n_val_arrivals"], holdout_phrasings=cfg.generate.holdout_phrasings)
    progress.update(len(paths))
    prompts = read_prompts(paths["prompts"])
    write_table(prompts[prompts["split"] == "train"].reset_index(drop=True), lay.prompts_train)
    split = prompts["split"].value_counts()
    return {"prompts": len(prompts), "train_prompts": int(split.get("train", 0)),
            "val_prompts": int(split.get("val", 0)), "test_prompts": int(split.get("test", 0)),
            "groups": int(prompts["group"].nunique()),
            "holdout_phrasings": cfg.generate.holdout_phrasings, **{k: n[k] for k in GENERATE_SIZES}}


def stage_mine(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    from raycache import mining

    progress.set_total(_count_lines(lay.prompts_train))
    return mining.run(MineConfig(prompts=str(lay.prompts_train), out=str(lay.mined), encoder=cfg.encoder,
                                 k=n["k"], random_per_prompt=n["random_per_prompt"], seed=cfg.generate.seed))


def label_config(cfg: PipelineConfig, lay: Layout) -> LabelConfig:
    """The label stage's config: the pipeline's teacher options on the mined pairs."""
    extra = {"concurrency": cfg.concurrency} if cfg.concurrency is not None else {}
    return LabelConfig(pairs=str(lay.mined), out=str(lay.labels), teacher=cfg.teacher,
                       teacher_model=cfg.teacher_model, endpoint=cfg.endpoint, api_key_env=cfg.api_key_env,
                       **extra)


def stage_label(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    from raycache.labeling import job

    result = job.run(label_config(cfg, lay))
    progress.set_total(result.get("labelled"))
    progress.update(result.get("labelled") or 0)
    return {"teacher": cfg.teacher, "teacher_model": cfg.teacher_model, **result}


def stage_train(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    from raycache.training import job

    labelled = _stage_result(lay, "label").get("labelled")
    per_loss = min(n["max_train_pairs"], labelled) if labelled else n["max_train_pairs"]
    progress.set_total(per_loss * n["epochs"] * len(cfg.losses))
    results = {}
    for i, loss in enumerate(cfg.losses):
        progress.next_part(per_loss * n["epochs"] * i)
        progress.set_fields(loss=loss)
        results[loss] = job.run(TrainConfig(
            pairs=str(lay.labels), val_pairs=str(lay.pairs_val), out=str(lay.train_dir(loss)),
            encoder=cfg.encoder, loss=loss, epochs=n["epochs"], workers=cfg.workers,
            max_pairs=n["max_train_pairs"], seed=cfg.generate.seed))
    progress.next_part(per_loss * n["epochs"] * len(cfg.losses))
    return results


def _models(cfg: PipelineConfig, lay: Layout) -> list[str]:
    return ["default"] + [str(lay.model(loss)) for loss in cfg.losses]


def stage_evaluate(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    from raycache import evaluation

    models = _models(cfg, lay)
    progress.set_total(len(models))
    result = evaluation.run(EvaluateConfig(pairs=str(lay.pairs_test), out=str(lay.eval), models=models,
                                           encoder=cfg.encoder), progress=False)
    progress.update(len(models))
    return result


def stage_simulate(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    """Offline replay of the test stream per model (sweep, plot), then each model's operating point:
    the threshold chosen on the val stream, read on the test stream."""
    from raycache import simulation

    models = _models(cfg, lay)
    progress.set_total(len(models))
    cache = cfg.cache.model_copy(update={"capacity": None})
    result = simulation.run(SimulateConfig(stream=str(lay.stream), out=str(lay.sim), models=models,
                                           encoder=cfg.encoder, cache=cache, delta=cfg.delta))
    operating = _operating_points(cfg, lay, models, cache)
    progress.update(len(models))
    write_text_atomic(lay.sim / "operating.json", json.dumps(operating, indent=2, default=str))
    return {"arrivals": result.get("arrivals"), "oracle_hit_rate": result.get("oracle_hit_rate"),
            "operating": operating, "report": result.get("report")}


def _operating_points(cfg: PipelineConfig, lay: Layout, models: list[str], cache) -> dict:
    """{model name: operating point at δ} with the threshold chosen on the val stream."""
    import numpy as np

    from raycache.data import read_stream
    from raycache.encoder import Encoder
    from raycache.simulation.offline import model_names, resolve_model

    calib, test = read_stream(lay.stream_val), read_stream(lay.stream)
    sim = _read_json(lay.sim / "simulation.json")
    resolved = [resolve_model(m) for m in models]
    out = {}
    for model, name in zip(resolved, model_names(resolved)):
        emb = (sim.get("models", {}).get(name) or {}).get("embeddings")
        tvec = np.load(emb) if emb and Path(emb).exists() else None
        # the val stream has a few hundred distinct prompts: embedded here, in the driver, faster than
        # starting an actor for them
        encoder = Encoder.from_config(cfg.encoder, model)
        codes, uniques = _factorize(calib["prompt"].astype(str).tolist())
        cvec = np.asarray(encoder.encode(uniques, batch_size=cfg.encoder.batch_size), np.float32)[codes]
        out[name] = operating_point(calib, test, name, cvec, tvec, cfg, cache)
    return out


def _factorize(texts: list[str]):
    import pandas as pd

    codes, uniques = pd.factorize(pd.Series(texts, dtype=object))
    return codes, [str(u) for u in uniques]


def operating_point(calib, test, name: str, calib_vecs, test_vecs, cfg: PipelineConfig, cache) -> dict:
    """One model's δ operating point (``raycache.simulation.operating`` where it exists)."""
    try:
        from raycache.simulation.operating import operating_point as op
    except ImportError:  # pragma: no cover - older simulation package
        op = None
    if op is not None and test_vecs is not None:
        result = op(calib, test, name, calib_vectors=calib_vecs, test_vectors=test_vecs,
                    deltas=(cfg.delta,), confidence=cfg.cache.confidence, cache=cache)
        entry = result["deltas"][0]
        chosen = entry.get("fixed_sequence") or {}
        rule = "fixed_sequence"
        if chosen.get("threshold") is None and (entry.get("empirical") or {}).get("threshold") is not None:
            chosen, rule = entry["empirical"], "empirical"
        return {"delta": cfg.delta, "rule": rule, "threshold": chosen.get("threshold"), "test": chosen,
                "fixed_sequence": entry.get("fixed_sequence"), "empirical": entry.get("empirical"),
                "best_on_test": entry.get("best_on_test"),
                "calibration_arrivals": result["calibration"]["arrivals"],
                "test_arrivals": result["test"]["arrivals"]}
    return {"delta": cfg.delta, "rule": None, "threshold": None, "test": {}}


def stage_live(cfg: PipelineConfig, lay: Layout, n: dict) -> dict:
    """Serve the model chosen by validation at the threshold chosen on the val stream, and replay the
    head of the test stream against it over HTTP."""
    from raycache import simulation
    from raycache.data import read_stream, write_table
    from raycache.service import app

    best, best_path = _served_model(cfg, lay)
    operating = _read_json(lay.sim / "operating.json").get(best, {})
    threshold, rule = operating.get("threshold"), operating.get("rule")
    if threshold is None:
        threshold, rule = cfg.cache.threshold, "config (no threshold met δ on the val stream)"
    stream = read_stream(lay.stream).head(n["live_arrivals"])
    progress.set_total(len(stream))
    live_stream = lay.live / "stream_head.jsonl"
    write_table(stream, live_stream)
    port = free_port()
    encoder = cfg.encoder.model_copy(update={"model": best_path})
    cache = cfg.cache.model_copy(update={"threshold": float(threshold), "policy": "static"})
    started = time.time()
    progress.set_fields(status="starting the service")
    if not cfg.verbose:  # Serve (re)configures its logger when it starts: filter its INFO lines
        logging.getLogger("ray.serve").addFilter(_warnings_only)
    info = app.run(ServeConfig(encoder=encoder, cache=cache, port=port, blocking=False))
    startup_s = time.time() - started
    progress.set_fields(status=None)
    try:
        result = simulation.run(SimulateConfig(stream=str(live_stream), out=str(lay.live),
                                               endpoint=info.get("url", f"http://127.0.0.1:{port}"),
                                               threshold=float(threshold), delta=cfg.delta,
                                               concurrency=2))
    finally:
        app.stop()
    progress.set_done(result.get("replayed") or len(stream))
    return {"model": best, "threshold": float(threshold), "threshold_rule": rule,
            "threshold_from": str(lay.stream_val.name), "startup_s": round(startup_s, 1), **result}


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _served_model(cfg: PipelineConfig, lay: Layout) -> tuple[str, Optional[str]]:
    """(display name, model folder or None for the base model) with the best validation AUC.

    A fine-tuned model's figure is its training's best validation AUC (val split); the base model's
    is the same figure before training. Never a test-split figure.
    """
    candidates: list[tuple[float, str, Optional[str]]] = []
    for loss in cfg.losses:
        tm = _read_json(lay.train_dir(loss) / "train_metrics.json")
        base = (tm.get("base") or {}).get("auc")
        if base is not None and not any(path is None for _, _, path in candidates):
            candidates.append((base, "base", None))
        if tm.get("best_val_auc") is not None and lay.model(loss).exists():
            candidates.append((tm["best_val_auc"], _label(lay.model(loss)), str(lay.model(loss))))
    if not candidates:
        return "base", None
    _, name, path = max(candidates, key=lambda c: c[0])
    return name, path


def _label(model: Path) -> str:
    from raycache.evaluation import model_label

    return model_label(str(model))


def _best_model(lay: Layout) -> tuple[str, str | None]:
    """(display name, model folder or None for the base model) with the best test AUC (report only)."""
    metrics = _read_json(lay.eval / "metrics.json")
    if not metrics:
        return "base", None
    name = max(metrics, key=lambda n: metrics[n]["auc"])
    return name, (None if name == "base" else metrics[name]["model"])


def _headline(sim: dict, model: str) -> dict:
    for name, entry in (sim.get("models") or {}).items():
        if name == model:
            return entry.get("headline", {}) or {}
    return {}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _count_lines(path: Path) -> Optional[int]:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


_STAGE_RESULTS: dict[str, dict] = {}


def _stage_result(lay: Layout, stage: str) -> dict:
    if stage in _STAGE_RESULTS:
        return _STAGE_RESULTS[stage]
    return (_read_json(lay.summary).get(stage) or {}).get("result") or {}


STAGE_FUNCS: dict[str, Callable] = {
    "generate": stage_generate, "mine": stage_mine, "label": stage_label, "train": stage_train,
    "evaluate": stage_evaluate, "simulate": stage_simulate, "live": stage_live,
}


# ----------------------------------------------------------------------------- the run


def _init_ray(verbose: bool, env: dict) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "log_to_driver": verbose}
    if not verbose:
        kwargs["logging_level"] = logging.WARNING
        kwargs["runtime_env"] = {"env_vars": env}
    ray.init(**kwargs)


def stage_note(stage: str, result: dict) -> str:
    """The figure a stage's closing line and the summary table show."""
    r = result or {}
    try:
        if stage == "generate":
            return (f"{r['prompts']} prompts ({r['train_prompts']} train / {r['val_prompts']} val / "
                    f"{r['test_prompts']} test), {r['groups']} groups")
        if stage == "mine":
            return f"{r['pairs']} pairs from {r['prompts']} prompts, {r['prompts_per_s']} prompts/s embedding"
        if stage == "label":
            return f"{r.get('labelled')} labelled by {r.get('teacher')}, positive rate {_f(r.get('positive_rate'))}"
        if stage == "train":
            return "; ".join(f"{loss}: val AUC {_f(v.get('base_val_auc'))} -> {_f(v.get('best_val_auc'))}"
                             for loss, v in r.items() if isinstance(v, dict))
        if stage == "evaluate":
            return "test AUC " + ", ".join(f"{k} {_f(v['auc'])}" for k, v in r.items() if isinstance(v, dict))
        if stage == "simulate":
            parts = []
            for name, op in (r.get("operating") or {}).items():
                t = op.get("test") or {}
                parts.append(f"{name} {_f(t.get('correct_hit_rate'))}")
            return "correct-hit rate at the val-chosen threshold: " + ", ".join(parts)
        if stage == "live":
            m = r.get("metrics") or {}
            return (f"{r.get('model')} @ {_f(r.get('threshold'))}: correct-hit {_f(m.get('correct_hit_rate'))}, "
                    f"false-hit {_f(m.get('false_hit_rate'))}, {r.get('throughput_arrivals_per_s')} arrivals/s")
    except (KeyError, TypeError, AttributeError):
        pass
    return ""


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def run(cfg: PipelineConfig, display: Optional[progress.Display] = None) -> dict:
    """Run the stages from ``cfg.from_stage`` to ``cfg.to_stage`` (default: all), then write the report."""
    for name, value in (("from", cfg.from_stage), ("to", cfg.to_stage)):
        if value is not None and value not in STAGES:
            raise ValueError(f"unknown stage {value!r} (--{name}); expected one of {', '.join(STAGES)}")
    first = STAGES.index(cfg.from_stage) if cfg.from_stage else 0
    last = STAGES.index(cfg.to_stage) if cfg.to_stage else len(STAGES) - 1
    if last < first:
        raise ValueError(f"--to {cfg.to_stage} comes before --from {cfg.from_stage}")
    lay = Layout(cfg.out)
    lay.out.mkdir(parents=True, exist_ok=True)
    n = sizes(cfg)
    done = _read_json(lay.summary)
    env = progress.quiet(cfg.verbose)
    display = display or progress.Display()
    _init_ray(cfg.verbose, env)
    display.listen()
    _STAGE_RESULTS.clear()
    t0 = time.time()
    todo = STAGES[first:last + 1]
    display.write(f"raycache pipeline ({'quick' if cfg.quick else 'full'} run, teacher {cfg.teacher}) "
                  f"-> {lay.out}")
    try:
        for i, stage in enumerate(todo, 1):
            with display.stage(stage, f"{i}/{len(todo)} {stage}", UNITS[stage]) as bar:
                start = time.time()
                result = STAGE_FUNCS[stage](cfg, lay, n)
                seconds = round(time.time() - start, 1)
                _STAGE_RESULTS[stage] = result
                bar.note = f"{seconds:.0f} s · {stage_note(stage, result)}"
            done[stage] = {"seconds": seconds, "result": result}
            write_text_atomic(lay.summary, json.dumps(done, indent=2, default=str))
    finally:
        display.stop()
    from raycache.report import write_report

    total_s = time.time() - t0
    report = write_report(lay, done, cfg, total_s=total_s)
    display.table(["stage", "seconds", "result"],
                  [[s, done[s]["seconds"], stage_note(s, done[s].get("result"))] for s in STAGES if s in done])
    display.write(f"total {total_s / 60:.1f} min · report: {report}  (also {report.with_suffix('.html').name})")
    return {"out": str(lay.out), "report": str(report), "seconds": round(total_s, 1)}
