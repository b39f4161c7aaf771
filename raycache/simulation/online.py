"""Simulation of the online policy: replay a labelled stream with verification on, the stream's
groups (or answers) acting as the judge (:mod:`raycache.cache.online_policy`).

Per arrival, as the service does it: the engine (static threshold at the online policy's candidate
floor) finds the nearest cached prompt; the online policy decides hit or miss with the namespace's
current threshold and whether to verify. A verified hit costs one extra upstream call and its caller
gets the upstream's answer (never a wrong one); a shadow verification judges a near miss whose
upstream call happens anyway. A miss stores the arrival. Reported: realised false-hit rate (wrong
answers served / arrivals), hit rate, the threshold over time, and the verification cost (extra
upstream calls and judge calls per arrival).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd


def simulate_online(stream: pd.DataFrame, vectors: np.ndarray, threshold: float, settings=None,
                    cache=None, seed: int = 0, trace_every: int = 250,
                    rolling: int = 2000) -> dict:
    """Replay ``stream`` (prompt, group or answers, optional namespace) with its ``vectors`` [n, dim]
    through the engine under an :class:`OnlinePolicy` starting at ``threshold``.

    Returns a JSON-safe dict: totals (``false_hit_rate``, ``hit_rate``, ``correct_hit_rate``,
    ``extra_upstream_calls_per_request``, ``judge_calls_per_request``), ``trace`` (every
    ``trace_every`` arrivals: arrival, verifications so far, threshold of the default namespace, the
    false-hit rate over the last ``rolling`` arrivals), ``changes`` (every threshold change with its
    evidence), ``verifications_until_under_delta`` (verifications done when the rolling false-hit
    rate was last above δ; None if it never was) and the second half's false-hit rate.
    """
    from raycache.cache.engine import SemanticCache
    from raycache.cache.online_policy import OnlinePolicy
    from raycache.cache.policy import StaticThreshold
    from raycache.config import CacheConfig
    from raycache.simulation.metrics import Decisions, correctness_mode, hit_correctness
    from raycache.simulation.replay import ReplayStream, single_threaded_math

    mode = correctness_mode(stream)
    if mode == "unknown":
        from raycache.data import DataError

        raise DataError("the online simulation judges by the stream's groups or answers")
    rs = ReplayStream.from_frame(stream, vectors)
    policy = OnlinePolicy(threshold, settings, seed=seed)
    delta = policy.settings.delta
    cache_cfg = (cache or CacheConfig(capacity=None)).model_copy(update={"persist_path": None})
    engine = SemanticCache.from_config(cache_cfg, encoder=None, dim=rs.dim,
                                       policy=StaticThreshold(policy.candidate_floor))
    n = len(rs)
    origin: dict[int, int] = {}
    candidate = Decisions.empty(n)  # the engine's nearest entry per arrival (at the floor)
    served = np.zeros(n, bool)
    verified_hit = np.zeros(n, bool)
    shadow = np.zeros(n, bool)
    trace, pending = [], []
    verifications = 0

    def judge_wrong(row: int, match: int) -> bool:
        probe = Decisions(hit=np.array([True]), matched_row=np.array([1]),
                          similarity=np.array([1.0], np.float32), exact=np.array([False]))
        pair = stream.iloc[[match, row]].reset_index(drop=True)
        return bool(hit_correctness(pair, probe, mode)[0] != 1)

    wrong_served = np.zeros(n, bool)
    with single_threaded_math():
        for row in range(n):
            vec = np.ascontiguousarray(rs.vectors[row], np.float32)
            prompt, space = rs.prompts[row], rs.namespaces[row]
            result = engine.check(prompt, namespace=space, vector=vec)
            match = origin.get(result.entry_id, -1) if result.hit else -1
            if result.hit:
                candidate.hit[row], candidate.matched_row[row] = True, match
            rid, decision = policy.decide(space, result.similarity if result.hit else None,
                                          exact=bool(result.exact))
            if decision.hit:
                served[row] = True
                if decision.verify == "hit":
                    verified_hit[row] = True  # the caller gets the upstream's answer
                elif match >= 0 and not result.exact:
                    wrong_served[row] = judge_wrong(row, match)
            if decision.verify and match >= 0:
                if decision.verify == "shadow":
                    shadow[row] = True
                policy.record(space, rid, judge_wrong(row, match))
                verifications += 1
            if not decision.hit:
                entry = engine.store(prompt, rs.responses[row], namespace=space, vector=vec)
                origin[int(entry)] = row
            if (row + 1) % trace_every == 0 or row == n - 1:
                lo = max(0, row + 1 - rolling)
                trace.append({"arrival": row + 1, "verifications": verifications,
                              "threshold": policy.threshold(str(rs.namespaces[0])),
                              "rolling_false_hit_rate": float(wrong_served[lo:row + 1].mean())})
    above = [p for p in trace if p["rolling_false_hit_rate"] > delta and p["arrival"] >= rolling]
    half = n // 2
    stats = policy.stats()
    return {
        "arrivals": n, "start_threshold": threshold, "delta": delta,
        "hit_rate": float(served.mean()),
        "correct_hit_rate": float((served & ~verified_hit & ~wrong_served).mean()),
        "false_hit_rate": float(wrong_served.mean()),
        "second_half_false_hit_rate": float(wrong_served[half:].mean()) if n > 1 else None,
        "verified_hits": int(verified_hit.sum()), "shadow_verifications": int(shadow.sum()),
        "extra_upstream_calls_per_request": float(verified_hit.sum() / n),
        "judge_calls_per_request": float(verifications / n),
        "final_thresholds": {k: v["threshold"] for k, v in stats["namespaces"].items()},
        "verifications_until_under_delta": above[-1]["verifications"] if above else None,
        "arrivals_until_under_delta": above[-1]["arrival"] if above else None,
        "changes": [c for space in stats["namespaces"] for c in policy.changes(space)],
        "trace": trace, "policy": stats,
    }
