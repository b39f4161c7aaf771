"""The offline simulation job: per model, the stream's vectors (:mod:`raycache.simulation.embed`),
a sweep of replays over thresholds (:mod:`raycache.simulation.replay`: the engine's decisions),
the calibrated / policy-file / online replays and the operating point, scored into the report.

The replay and embedding names are re-exported here (``offline.replay_sweep`` etc.), as before.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from raycache.config import ConfigError
from raycache.data import DataError
from raycache.simulation.embed import (  # noqa: F401  (re-exported)
    embed_prompts,
    embed_stream,
    ensure_ray,
    load_embeddings,
    resolve_model,
)
from raycache.simulation.replay import (  # noqa: F401  (re-exported)
    DEFAULT_CHUNK,
    MEMO_ENTRIES,
    ReplayStream,
    arrival_times,
    default_thresholds,
    placeholder_response,
    replay_engine,
    replay_sweep,
    replay_vectorized,
    single_threaded_math,
    text_keys,
    unit_rows,
    vectorized_supported,
)

logger = logging.getLogger(__name__)


def model_names(models: Sequence[Optional[str]]) -> list[str]:
    """Display names as in evaluation's metrics.json ('base', or the model folder's name), unique."""
    from raycache.evaluation import model_label

    names: list[str] = []
    for model in models:
        name = model_label(model)
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def simulate_model(stream: pd.DataFrame, vectors: np.ndarray, cfg, mode: str,
                   model: Optional[str] = None) -> dict:
    """Sweep (or the single ``cfg.threshold``) for one model's stream vectors -> its report entry.

    With the calibrated policy (and no ``cfg.threshold``), the engine also replays the stream under
    the policy fitted for ``model`` (entry ``calibrated``). The per-threshold Decisions are returned
    under ``"_decisions"`` (to be removed before writing JSON).
    """
    from raycache.simulation.metrics import headline, replay_metrics

    replay_stream = ReplayStream.from_frame(stream, vectors)
    thresholds = ([cfg.threshold] if cfg.threshold is not None
                  else list(cfg.thresholds) or default_thresholds())
    times = arrival_times(stream, cfg.rate)
    started = time.perf_counter()
    decisions, used = replay_sweep(replay_stream, cfg.cache, thresholds, cfg.replay,
                                   cfg.chunk_size, times)
    replay_s = time.perf_counter() - started
    sweep = [{**replay_metrics(stream, decisions[t], t, mode), "replay": used[t]}
             for t in sorted(decisions)]
    entry = {
        "replay_seconds": round(replay_s, 3),
        # every (arrival, threshold) decision counts: a sweep replays the stream once per threshold
        "arrivals_per_s": round(len(stream) * len(thresholds) / max(replay_s, 1e-9), 1),
        "thresholds": len(thresholds),
        "sweep": sweep,
        "headline": headline(sweep, cfg.delta),
    }
    if cfg.cache.policy == "calibrated" and cfg.threshold is None:
        from raycache.cache.engine import policy_from_config
        from raycache.encoder import Encoder

        encoder = Encoder.from_config(cfg.encoder, model)
        policy = policy_from_config(cfg.cache, encoder)
        calibrated, _ = replay_engine(replay_stream, cfg.cache, policy=policy, times=times,
                                      chunk_size=cfg.chunk_size)
        threshold = policy.threshold if np.isfinite(policy.threshold) else None
        entry["calibrated"] = {**replay_metrics(stream, calibrated, threshold, mode),
                               "policy": policy.describe(), "replay": "engine"}
    if getattr(cfg, "policy", None):
        entry["policy"] = policy_replay(stream, replay_stream, cfg, mode, model, times)
    entry["_decisions"] = decisions
    return entry


def policy_replay(stream: pd.DataFrame, replay_stream: ReplayStream, cfg, mode: str,
                  model: Optional[str], times: Optional[np.ndarray] = None) -> dict:
    """Replay under the policy file ``cfg.policy`` (checked against ``model``; nothing refitted):
    its metrics, the file's claims, and whether the realised rate of its bound kind is ≤ its δ."""
    from raycache.policy_file import load_policy
    from raycache.simulation.metrics import replay_metrics

    policy_file = load_policy(cfg.policy, model)
    policy = policy_file.decision_policy(cfg.policy)
    decisions, _ = replay_engine(replay_stream, cfg.cache, policy=policy, times=times,
                                 chunk_size=cfg.chunk_size)
    m = replay_metrics(stream, decisions, policy_file.threshold, mode)
    realised = None
    if m["false_hits"] is not None:
        realised = (m["false_hit_rate"] if policy_file.bound == "per_request"
                    else (m["false_hits"] / m["hits"] if m["hits"] else 0.0))
    return {**m, "replay": "engine", "policy": policy.describe(), "bound": policy_file.bound,
            "realised_rate": realised,
            "within_delta": None if realised is None else bool(realised <= policy_file.delta + 1e-12)}


def operating_point_entry(cfg, stream: pd.DataFrame, vectors: np.ndarray, model: Optional[str],
                          name: str, out: Path, mode: str) -> Optional[dict]:
    """The operating point (:mod:`raycache.simulation.operating`) for one model: calibration on
    ``cfg.calibration_stream`` (test = the stream), else on half of the stream's groups."""
    from raycache.simulation.operating import operating_point, operating_point_split

    if not cfg.operating_point or mode == "unknown":
        return None
    common = dict(deltas=cfg.operating_deltas, confidence=cfg.confidence, cache=cfg.cache)
    if not cfg.calibration_stream:
        if len(stream) < 2:
            return None
        try:
            return operating_point_split(stream, vectors, model, seed=cfg.seed, **common)
        except DataError as exc:
            logger.warning("%s: no operating point: %s", name, exc)
            return {"skipped": str(exc)}
    from raycache.data import parse_columns, read_stream

    calib = read_stream(cfg.calibration_stream, columns=parse_columns(cfg.read.columns),
                        skip_invalid=cfg.read.skip_invalid)
    if cfg.calibration_embeddings:
        calib_vectors = load_embeddings(cfg.calibration_embeddings, len(calib))
    elif cfg.embeddings:
        raise ConfigError("calibration_stream with precomputed embeddings needs "
                          "calibration_embeddings too")
    else:
        ensure_ray()
        calib_vectors = embed_stream(calib["prompt"].astype(str).tolist(),
                                     cfg.encoder.model_copy(update={"model": model}),
                                     out / "embeddings" / f"{name}_calibration.npy")
    result = operating_point(calib, stream, model, calib_vectors=np.asarray(calib_vectors),
                             test_vectors=np.asarray(vectors), **common)
    result["split"] = {"calibration": cfg.calibration_stream, "test": cfg.stream}
    return result


def run_offline(cfg, stream: pd.DataFrame, out: Path) -> dict:
    """Embed (or load) the stream's vectors per model, replay, score; returns the report dict."""
    from raycache.simulation.metrics import correctness_mode, oracle_hits
    from raycache.simulation.plot import plot_hit_vs_false_hit

    models = [resolve_model(m) for m in (cfg.models or [cfg.encoder.model])]
    if cfg.policy and len(models) > 1:
        raise ConfigError("policy: a policy file is fitted for one model; "
                          f"got {len(models)} models")
    if cfg.policy:  # refuse a policy fitted for another model before embedding anything
        from raycache.policy_file import load_policy

        load_policy(cfg.policy, models[0])
    if cfg.embeddings and len(models) > 1:
        raise ConfigError("embeddings: one precomputed .npy matches one model; "
                          f"got {len(models)} models")
    mode = correctness_mode(stream)
    oracle = oracle_hits(stream, mode)
    report: dict = {
        "mode": "offline", "stream": cfg.stream, "arrivals": len(stream), "correctness": mode,
        "oracle_hit_rate": float(oracle.mean()) if mode != "unknown" else None,
        "delta": cfg.delta, "cache": cfg.cache.model_dump(), "models": {},
    }
    for model, name in zip(models, model_names(models)):
        started = time.perf_counter()
        if cfg.embeddings:
            vectors = load_embeddings(cfg.embeddings, len(stream))
            source = cfg.embeddings
        else:
            ensure_ray()
            encoder_cfg = cfg.encoder.model_copy(update={"model": model})
            vectors = embed_stream(stream["prompt"].astype(str).tolist(), encoder_cfg,
                                   out / "embeddings" / f"{name}.npy")
            source = str(out / "embeddings" / f"{name}.npy")
        embed_s = time.perf_counter() - started
        entry = simulate_model(stream, vectors, cfg, mode, model)
        decisions = entry.pop("_decisions")
        if cfg.online_start is not None and mode != "unknown":
            from raycache.cache.online_policy import OnlineSettings
            from raycache.simulation.online import simulate_online

            entry["online"] = simulate_online(
                stream, vectors, cfg.online_start,
                OnlineSettings(delta=cfg.delta, confidence=cfg.confidence), cfg.cache, cfg.seed)
            logger.info("%s: online from %.3f: false-hit %.4f, hit rate %.4f, final thresholds %s, "
                        "%.3f extra upstream calls per request", name, cfg.online_start,
                        entry["online"]["false_hit_rate"], entry["online"]["hit_rate"],
                        entry["online"]["final_thresholds"],
                        entry["online"]["extra_upstream_calls_per_request"])
        op = operating_point_entry(cfg, stream, vectors, model, name, out, mode)
        if op is not None:
            entry["operating_point"] = op
            for d in op.get("deltas", []):
                fs, best = d["fixed_sequence"], d["best_on_test"]
                logger.info("%s: δ=%g: correct-hit %.4f (false-hit %.4f, threshold %s) with the "
                            "calibrated threshold; best on the test part %s", name, d["delta"],
                            fs["correct_hit_rate"], fs["false_hit_rate"], fs["threshold"],
                            f"{best['correct_hit_rate']:.4f}" if best else "none")
        if cfg.threshold is not None:
            path = out / f"decisions_{name}.parquet"
            decisions[float(cfg.threshold)].to_frame().to_parquet(path)
            entry["decisions"] = str(path)
        report["models"][name] = {"model": model or "all-MiniLM-L6-v2 (embedded default)",
                                  "embeddings": source, "embed_seconds": round(embed_s, 3), **entry}
        best = entry["headline"]
        logger.info("%s: %d arrivals x %d thresholds replayed at %.0f arrivals/s; %s", name,
                    len(stream), entry["thresholds"], entry["arrivals_per_s"],
                    f"hit rate {best['hit_rate']:.3f} at false-hit rate {best['false_hit_rate']:.4f} "
                    f"(threshold {best['threshold']:g})" if best else f"no threshold with false-hit "
                    f"rate <= {cfg.delta:g}")
    plot = plot_hit_vs_false_hit({name: m["sweep"] for name, m in report["models"].items()},
                                 cfg.delta, out / "hit_vs_false_hit.png", report["oracle_hit_rate"])
    report["plot"] = str(plot) if plot else None
    return report
