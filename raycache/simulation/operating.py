"""The operating-point metric: correct-hit rate at a per-arrival false-hit budget δ, with the
threshold chosen on a calibration stream and read on a test stream disjoint from it by group.

A cache is worth what it serves correctly while keeping wrong answers under the budget users set,
so this is the figure to compare encoders and decision rules by (issues 12 and 13). For each δ:

* ``fixed_sequence``: the threshold ``raycache calibrate`` would choose on the calibration stream
  (upper confidence bound on the per-arrival false-hit rate ≤ δ, fixed-sequence testing from high to
  low thresholds: :func:`raycache.calibration.fixed_sequence`), read on the test stream;
* ``empirical``: the lowest threshold whose *empirical* calibration false-hit rate is ≤ δ (no
  confidence), read on the test stream;
* ``best_on_test``: the threshold with the highest correct-hit rate among those whose test false-hit
  rate is ≤ δ, chosen on the test stream itself: an **upper bound**, not a method.

Every entry reports hit, correct-hit and false-hit rates per arrival, and the same for semantic hits
apart from exact repeats (``semantic_*``, ``exact_hit_rate``). Both streams are replayed with the
engine's decision rule (the offline simulator's sweep) on one threshold grid, so the chosen
thresholds are read off the test replay exactly.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd

from raycache.data import DataError

DEFAULT_DELTAS = (0.01, 0.02, 0.05)
NEVER = 2.0  # a threshold no cosine reaches: the cache answers exact repeats only


def _group_keys(stream: pd.DataFrame) -> np.ndarray:
    """[n] object: the component each arrival belongs to for a split (its group; with answers only,
    the connected component of arrivals sharing an answer; rows with neither: their own prompt)."""
    from raycache.answers import answer_set
    from raycache.splits import UnionFind
    from raycache.simulation.metrics import correctness_mode

    mode = correctness_mode(stream)
    prompts = stream["prompt"].astype(str).to_numpy(dtype=object)
    if mode == "group":
        groups = stream["group"].to_numpy(dtype=object)
        return np.array([f"g:{g}" if pd.notna(g) else f"p:{p}" for g, p in zip(groups, prompts)],
                        dtype=object)
    sets = UnionFind()
    keys = []
    answers = stream["answers"] if "answers" in stream.columns else [None] * len(stream)
    for prompt, ans in zip(prompts, answers):
        items = [f"a:{a}" for a in sorted(answer_set(ans))] or [f"p:{prompt}"]
        for other in items[1:]:
            sets.union(items[0], other)
        keys.append(items[0])
    return np.array([sets.find(k) for k in keys], dtype=object)


def split_by_group(stream: pd.DataFrame, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """[n] bool: True for the calibration part. Whole groups (connected components of shared
    answers when the stream has answers only) go to one side, chosen in a seeded random order until
    about ``fraction`` of the arrivals are on the calibration side."""
    keys = _group_keys(stream)
    codes, uniques = pd.factorize(pd.Series(keys, dtype=object))
    sizes = np.bincount(codes, minlength=len(uniques))
    order = np.random.default_rng(seed).permutation(len(uniques))
    take = np.zeros(len(uniques), bool)
    filled, want = 0, fraction * len(stream)
    for c in order:
        if filled >= want:
            break
        take[c], filled = True, filled + sizes[c]
    return take[codes]


def _as_frame(stream: Union[pd.DataFrame, str]) -> pd.DataFrame:
    if isinstance(stream, pd.DataFrame):
        return stream.reset_index(drop=True)
    from raycache.data import read_stream

    return read_stream(str(stream))


def _embed(frame: pd.DataFrame, model: Optional[str], encoder: Any) -> np.ndarray:
    if encoder is None:
        from raycache.encoder import Encoder

        encoder = Encoder.load(model)
    codes, uniques = pd.factorize(frame["prompt"].astype(str))
    return np.asarray(encoder.encode(list(uniques)), np.float32)[codes]


def _row(counts, i: int) -> dict:
    n = counts.arrivals
    exact, exact_ok = int(counts.exact_hits[i]), int(counts.exact_correct_hits[i])
    semantic = int(counts.hits[i]) - exact
    sem_ok = int(counts.correct_hits[i]) - exact_ok
    sem_false = int(counts.false_hits[i]) - (exact - exact_ok)
    t = float(counts.thresholds[i])
    return {
        "threshold": None if t >= NEVER else t,
        "hit_rate": counts.hits[i] / n, "correct_hit_rate": counts.correct_hits[i] / n,
        "false_hit_rate": counts.false_hits[i] / n,
        "exact_hit_rate": exact / n, "semantic_hit_rate": semantic / n,
        "semantic_correct_hit_rate": sem_ok / n, "semantic_false_hit_rate": max(sem_false, 0) / n,
        "hits": int(counts.hits[i]), "correct_hits": int(counts.correct_hits[i]),
        "false_hits": int(counts.false_hits[i]), "exact_hits": exact, "semantic_hits": semantic,
    }


def operating_point(calib: Union[pd.DataFrame, str], test: Union[pd.DataFrame, str],
                    model: Optional[str] = None, *, calib_vectors: Optional[np.ndarray] = None,
                    test_vectors: Optional[np.ndarray] = None,
                    deltas: Sequence[float] = DEFAULT_DELTAS, confidence: float = 0.95,
                    thresholds: Optional[Sequence[float]] = None, cache=None, encoder: Any = None,
                    check_disjoint: bool = True, clusters: str = "confusion",
                    horizon: Union[int, str, None] = None) -> dict:
    """Correct-hit rate on ``test`` at per-arrival false-hit ≤ δ, threshold chosen on ``calib``.

    ``calib`` / ``test``: labelled streams in arrival order (DataFrames or paths; columns ``prompt``
    and ``group`` or ``answers``, optional ``namespace``), disjoint by group (checked unless
    ``check_disjoint=False``). ``calib_vectors`` / ``test_vectors``: their embeddings [n, dim], one row
    per arrival (then ``model`` is only a label); otherwise each stream is embedded with ``encoder``
    (anything with ``encode(list[str])``) or ``Encoder.load(model)``. ``thresholds``: the grid
    (default :func:`raycache.calibration.calibration_thresholds`); ``cache``: the CacheConfig to
    replay (default unbounded, exact tier on); ``clusters``: how the calibration bound counts
    correlated arrivals (:func:`raycache.calibration.stream_counts`); ``horizon``: None bounds the
    traffic's false-hit rate, an int the realised rate over that many requests, ``"test"`` over the
    test stream's length, ``"calibration"`` over the calibration stream's (``raycache calibrate``'s
    default; :func:`raycache.calibration.realised_upper`).

    Returns a JSON-safe dict: ``calibration`` / ``test`` (arrivals, oracle hit rate), ``confidence``,
    and ``deltas``: one entry per δ with ``fixed_sequence`` (threshold, ``calibration_ucb``, the test
    metrics, ``within_delta``), ``empirical`` (the same, plain rule) and ``best_on_test``
    (``upper_bound: True``), plus ``fixed_sequence_vs_best`` (correct-hit ratio). Thresholds are
    None when no threshold qualifies (the cache then serves exact repeats only). Each metric block:
    ``hit_rate``, ``correct_hit_rate``, ``false_hit_rate``, ``exact_hit_rate``,
    ``semantic_hit_rate``, ``semantic_correct_hit_rate``, ``semantic_false_hit_rate`` and counts.
    """
    from raycache.calibration import calibration_thresholds, empirical_rule, fixed_sequence, stream_counts
    from raycache.simulation.metrics import correctness_mode, oracle_hits

    calib_frame, test_frame = _as_frame(calib), _as_frame(test)
    for name, frame in (("calibration", calib_frame), ("test", test_frame)):
        if correctness_mode(frame) == "unknown":
            raise DataError(f"the {name} stream needs a 'group' or 'answers' column")
    if check_disjoint:
        shared = set(_group_keys(calib_frame).tolist()) & set(_group_keys(test_frame).tolist())
        shared = {k for k in shared if not k.startswith("p:")}
        if shared:
            raise DataError(f"the calibration and test streams share {len(shared)} groups (e.g. "
                            f"{sorted(shared)[:3]}); split them by group (split_by_group)")
    if calib_vectors is None:
        calib_vectors = _embed(calib_frame, model, encoder)
    if test_vectors is None:
        test_vectors = _embed(test_frame, model, encoder)
    grid = sorted({float(t) for t in (thresholds or calibration_thresholds())} | {NEVER}, reverse=True)
    cal = stream_counts(calib_frame, calib_vectors, grid, cache, clusters=clusters)
    tst = stream_counts(test_frame, test_vectors, grid, cache, clusters="none")  # read, not bounded
    at = {float(t): i for i, t in enumerate(tst.thresholds)}
    if horizon in ("test", "calibration"):
        horizon = tst.arrivals if horizon == "test" else cal.arrivals
    out: dict = {
        "model": model or "default",
        "calibration": {"arrivals": cal.arrivals, "oracle_hit_rate": float(oracle_hits(calib_frame).mean())},
        "test": {"arrivals": tst.arrivals, "oracle_hit_rate": float(oracle_hits(test_frame).mean())},
        "confidence": confidence, "horizon": horizon, "thresholds": len(grid) - 1, "deltas": [],
    }
    test_rows = [_row(tst, i) for i in range(len(tst.thresholds))]
    for delta in deltas:
        entry: dict = {"delta": float(delta)}
        for sel in (fixed_sequence(cal, delta, confidence, horizon=horizon), empirical_rule(cal, delta)):
            t = NEVER if sel.threshold is None else sel.threshold
            row = dict(test_rows[at[t]])
            row["within_delta"] = bool(row["false_hit_rate"] <= delta + 1e-12)
            row["calibration_false_hit_rate"] = float(cal.false_hits[at[t]] / cal.arrivals)
            if sel.rule == "fixed_sequence":
                row["calibration_ucb"] = None if sel.index is None else float(sel.ucb[sel.index])
            entry[sel.rule] = row
        eligible = [r for r in test_rows if r["false_hit_rate"] <= delta + 1e-12]
        best = max(eligible, key=lambda r: (r["correct_hit_rate"], -(r["threshold"] or NEVER)),
                   default=None)
        entry["best_on_test"] = {**best, "upper_bound": True} if best else None
        best_rate = best["correct_hit_rate"] if best else 0.0
        entry["fixed_sequence_vs_best"] = (entry["fixed_sequence"]["correct_hit_rate"] / best_rate
                                           if best_rate > 0 else None)
        out["deltas"].append(entry)
    return out


def operating_point_split(stream: Union[pd.DataFrame, str], vectors: Optional[np.ndarray] = None,
                          model: Optional[str] = None, fraction: float = 0.5, seed: int = 0,
                          **kwargs: Any) -> dict:
    """:func:`operating_point` on one stream split by group (:func:`split_by_group`): about
    ``fraction`` of its arrivals calibrate, the rest test. ``vectors`` [n, dim] for the whole stream."""
    frame = _as_frame(stream)
    mask = split_by_group(frame, fraction, seed)
    if mask.all() or not mask.any():
        raise DataError("the stream has too few groups to split into calibration and test parts")
    if vectors is None:
        vectors = _embed(frame, model, kwargs.pop("encoder", None))
    cal_rows, test_rows = np.flatnonzero(mask), np.flatnonzero(~mask)
    result = operating_point(frame.iloc[cal_rows].reset_index(drop=True),
                             frame.iloc[test_rows].reset_index(drop=True), model,
                             calib_vectors=np.asarray(vectors[cal_rows], np.float32),
                             test_vectors=np.asarray(vectors[test_rows], np.float32), **kwargs)
    result["split"] = {"by": "group", "fraction": fraction, "seed": seed}
    return result
