"""Scoring a replay: which hits were correct, the oracle, per-threshold metrics and the δ headline.

A replay produces one decision per arrival (:class:`Decisions`). Whether a hit was correct is judged
against the arrival the matched cache entry was stored from ("its origin row"): same ``group`` when
the stream has groups, else intersecting normalised ``answers``, else unknown. Offline and live
replays are scored by the same functions, so their metrics are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from raycache.answers import answer_set
from raycache.data import stream_namespaces
from raycache.numeric import percentiles

CORRECTNESS_MODES = ("group", "answers", "unknown")


@dataclass
class Decisions:
    """Per-arrival outcome of a replay; every array has one entry per arrival, in arrival order.

    ``hit`` [n] bool; ``matched_row`` [n] int64: the arrival whose stored entry answered the hit (-1 on
    a miss, or when the entry was not stored by this replay); ``similarity`` [n] float32 (NaN on a
    miss against an empty scope); ``exact`` [n] bool: answered by the exact-match tier.
    """

    hit: np.ndarray
    matched_row: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "Decisions":
        return cls(hit=np.zeros(n, bool), matched_row=np.full(n, -1, np.int64),
                   similarity=np.full(n, np.nan, np.float32), exact=np.zeros(n, bool))

    def __len__(self) -> int:
        return len(self.hit)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"hit": self.hit, "matched_row": self.matched_row,
                             "similarity": self.similarity, "exact": self.exact})


def correctness_mode(stream: pd.DataFrame) -> str:
    """'group' if any arrival has a group, else 'answers' if any has answers, else 'unknown'."""
    if "group" in stream.columns and stream["group"].notna().any():
        return "group"
    if "answers" in stream.columns and any(answer_set(a) for a in stream["answers"]):
        return "answers"
    return "unknown"


def oracle_hits(stream: pd.DataFrame, mode: Optional[str] = None) -> np.ndarray:
    """[n] bool: the arrival's group (or an answer) already appeared earlier in its namespace.

    That is the best any cache can do (unlimited capacity, a perfect similarity). Arrivals whose
    correctness is unknown are never oracle hits.
    """
    mode = mode or correctness_mode(stream)
    n = len(stream)
    if mode == "unknown":
        return np.zeros(n, bool)
    ns = stream_namespaces(stream)
    if mode == "group":
        groups = stream["group"]
        keyed = pd.DataFrame({"ns": ns, "group": groups.astype(object)})
        return (keyed.duplicated(keep="first") & groups.notna()).to_numpy()
    seen: set[tuple[str, str]] = set()
    out = np.zeros(n, bool)
    for i, (space, answers) in enumerate(zip(ns, stream["answers"])):
        keys = {(space, a) for a in answer_set(answers)}
        out[i] = bool(keys & seen)
        seen |= keys
    return out


def hit_correctness(stream: pd.DataFrame, decisions: Decisions,
                    mode: Optional[str] = None) -> np.ndarray:
    """[n] int8 per arrival: 1 correct hit, 0 false hit, -1 hit of unknown correctness; 2 for a miss."""
    mode = mode or correctness_mode(stream)
    out = np.full(len(decisions), 2, np.int8)
    hit_rows = np.flatnonzero(decisions.hit)
    out[hit_rows] = -1
    matched = decisions.matched_row[hit_rows]
    known = matched >= 0
    rows, origin = hit_rows[known], matched[known]
    if mode == "group":
        groups = stream["group"].to_numpy(dtype=object)
        present = pd.notna(groups[rows]) & pd.notna(groups[origin])
        same = groups[rows] == groups[origin]
        out[rows[present]] = same[present].astype(np.int8)
    elif mode == "answers":
        answers = stream["answers"].to_numpy(dtype=object)
        for r, o in zip(rows.tolist(), origin.tolist()):
            a, b = answer_set(answers[r]), answer_set(answers[o])
            if a and b:
                out[r] = int(bool(a & b))
    return out


def _rate(count: int, total: int) -> Optional[float]:
    return count / total if total else None


def replay_metrics(stream: pd.DataFrame, decisions: Decisions, threshold: Optional[float] = None,
                   mode: Optional[str] = None) -> dict:
    """Hit rate, correct-hit rate, false-hit rate (false hits / arrivals), precision of hits, calls.

    Rates are fractions of arrivals; correct/false counts are None when correctness is unknown.
    """
    mode = mode or correctness_mode(stream)
    n = len(decisions)
    verdict = hit_correctness(stream, decisions, mode)
    hits = int(decisions.hit.sum())
    correct, false = int((verdict == 1).sum()), int((verdict == 0).sum())
    known = mode != "unknown"
    return {
        "threshold": threshold,
        "arrivals": n,
        "hits": hits,
        "exact_hits": int(decisions.exact.sum()),
        "correct_hits": correct if known else None,
        "false_hits": false if known else None,
        "unknown_hits": int((verdict == -1).sum()),
        "hit_rate": _rate(hits, n),
        "correct_hit_rate": _rate(correct, n) if known else None,
        "false_hit_rate": _rate(false, n) if known else None,
        "precision": _rate(correct, correct + false) if known else None,
        "llm_calls": n - hits,
        "llm_calls_saved": hits,
    }


def headline(sweep: Sequence[dict], delta: float) -> Optional[dict]:
    """The best hit rate among sweep points whose false-hit rate is ≤ δ (ties: fewer false hits).

    Returns that point's threshold, hit rate, false-hit rate, correct-hit rate and precision, or None
    when no point qualifies (or correctness is unknown).
    """
    eligible = [m for m in sweep if m.get("false_hit_rate") is not None
                and m["false_hit_rate"] <= delta + 1e-12]
    if not eligible:
        return None
    best = max(eligible, key=lambda m: (m["hit_rate"], -m["false_hit_rate"]))
    return {"delta": delta, **{k: best[k] for k in (
        "threshold", "hit_rate", "false_hit_rate", "correct_hit_rate", "precision")}}


def latency_summary(latencies_s: Sequence[float]) -> Optional[dict]:
    """p50/p95/p99/mean/max of request latencies given in seconds, reported in milliseconds."""
    if len(latencies_s) == 0:
        return None
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    return {"count": int(len(ms)), **{f"{k}_ms": v for k, v in percentiles(ms).items()},
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max())}
