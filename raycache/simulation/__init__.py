"""Streaming cache simulation: replay a prompt stream through the cache, offline or live.

``run(cfg)`` (the ``raycache simulate`` job) reads the stream and

* offline (no ``cfg.endpoint``): embeds it with Ray Data per model (or memory-maps
  ``cfg.embeddings``), replays it in arrival order through the cache engine's decisions for each
  threshold of the sweep (or ``cfg.threshold``), and reports per model the sweep's metrics and the
  headline: the best hit rate at false-hit rate ≤ δ (``hit_vs_false_hit.png`` plots the sweep);
* live (``cfg.endpoint``): replays it against a running service with a pool of HTTP client actors
  and reports the same metrics plus latency percentiles and throughput.

Both write ``simulation.json`` in ``cfg.out``. Modules: ``metrics`` (scoring, oracle, headline),
``offline`` (embedding, vectorized and engine replays, sweep), ``live`` (HTTP replay), ``plot``,
``operating`` (the operating point: correct-hit rate at per-arrival false-hit ≤ δ, threshold chosen
on a calibration stream disjoint by group; :func:`operating_point`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from raycache.config import SimulateConfig
from raycache.io import strict_json, write_json_atomic
from raycache.simulation.replay import read_stream_frame

logger = logging.getLogger(__name__)

__all__ = ["run", "read_stream_frame", "summarize", "write_json_atomic", "operating_point",
           "operating_point_split", "split_by_group"]


def operating_point(calib, test, model=None, **kwargs):
    """Correct-hit rate at per-arrival false-hit ≤ δ on ``test``, the threshold chosen on ``calib``
    (disjoint by group): see :func:`raycache.simulation.operating.operating_point`."""
    from raycache.simulation.operating import operating_point as _operating_point

    return _operating_point(calib, test, model, **kwargs)


def operating_point_split(stream, vectors=None, model=None, **kwargs):
    """:func:`operating_point` on one stream split by group into calibration and test halves."""
    from raycache.simulation.operating import operating_point_split as _split

    return _split(stream, vectors, model, **kwargs)


def split_by_group(stream, fraction: float = 0.5, seed: int = 0):
    """[n] bool, True for the calibration part: whole groups on one side (see ``operating``)."""
    from raycache.simulation.operating import split_by_group as _split_by_group

    return _split_by_group(stream, fraction, seed)


def summarize(report: dict) -> dict:
    """The report without its bulky parts (each model's sweep, the cache config)."""
    out = {k: v for k, v in report.items() if k not in ("models", "cache")}
    if "models" in report:
        out["models"] = {name: {k: (v if k != "online" else
                                    {a: b for a, b in v.items() if a not in ("trace", "policy")})
                                for k, v in entry.items() if k != "sweep"}
                         for name, entry in report["models"].items()}
    return out


def run(cfg: SimulateConfig) -> dict:
    """``raycache simulate``: offline replay + sweep, or live replay against ``cfg.endpoint``.

    Writes the full report to ``<out>/simulation.json`` and returns its summary (no sweeps), with
    ``report`` = that file's path.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if cfg.endpoint:
        from raycache.simulation.live import run_live

        report = run_live(cfg, out)
    else:
        from raycache.simulation.offline import run_offline

        report = run_offline(cfg, read_stream_frame(cfg), out)
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_json_atomic(report, out / "simulation.json")
    logger.info("simulation written to %s", out / "simulation.json")
    return strict_json({**summarize(report), "report": str(out / "simulation.json")})
