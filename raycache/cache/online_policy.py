"""Online threshold control from verified hits, per namespace (issue 13).

The cache keeps serving with a threshold per namespace; a share of the requests whose nearest
cached prompt is close to that threshold is *verified* (a judge says whether the cached response
answers the new prompt), and the threshold moves with the evidence:

* **which requests are verified** (:meth:`OnlinePolicy.decide`): a hit with similarity
  s < t + ``near_margin`` with probability ``verify_near``, a hit further above with ``verify_far``
  (each costs one extra upstream call: the caller gets the upstream's answer), and a miss with
  t − ``explore_margin`` ≤ s < t with ``explore`` ("shadow" verification: the upstream is called
  anyway, only the judge runs; it is the evidence that lets the threshold come down);
* **the bound** (:meth:`OnlinePolicy.bound`): over the last ``window`` requests of the namespace,
  the per-request false-hit rate a threshold t' would have is bounded by stratifying the requests
  whose nearest prompt has s ≥ t' by the verification probability q_k they were sampled with:

      UCB(t') = Σ_k (H_k / N) · CP(W_k, V_k; 1 − α / K)

  with N the requests in the window, H_k the requests of stratum k with s ≥ t', V_k of them
  verified, W_k judged wrong, CP the one-sided Clopper–Pearson upper bound, K the non-empty strata
  (Bonferroni over strata; a stratum with no verification counts as all wrong). Verification is a
  coin flip independent of the answer, so within a stratum the verified requests are a random
  sample of its would-be hits. (It treats "s ≥ t'" as "would have hit under t'", ignoring that a
  different threshold stores slightly different entries.)
* **moves** (:meth:`OnlinePolicy.record`, every ``check_every`` verifications once
  ``min_verified`` are in): when UCB(t) > δ, the threshold rises to the lowest grid point above t
  whose bound is ≤ δ (else by ``raise_step``); when UCB(t) ≤ δ, it comes down to the lowest grid
  point in [max(floor, t − explore_margin), t) whose bound is ≤ δ, if any. Each change is logged
  with its evidence and kept in ``changes``.

Thread-safe; no Ray, no I/O: the service (:mod:`raycache.service.verify`) and the offline
simulation (:func:`simulate_online`) drive it.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from raycache.cache.policy import clopper_pearson_upper

logger = logging.getLogger(__name__)

GRID_STEP = 0.005


@dataclass
class OnlineSettings:
    """Knobs of :class:`OnlinePolicy` (see the module docstring)."""

    delta: float = 0.02
    confidence: float = 0.95
    verify_near: float = 0.5
    verify_far: float = 0.05
    near_margin: float = 0.03
    explore: float = 0.3
    explore_margin: float = 0.03
    window: int = 20_000
    min_verified: int = 30
    check_every: int = 10
    raise_step: float = 0.01
    floor: Optional[float] = None  # lowest threshold it may come down to; None = initial − 0.05
    ceiling: float = 0.995


@dataclass
class Decision:
    """What to do with one request: serve from the cache (``hit``) or not, and whether to verify it
    (``verify``: None, 'hit' = extra upstream call + judge, 'shadow' = judge on a miss), sampled with
    probability ``q``."""

    hit: bool
    verify: Optional[str] = None
    q: float = 0.0
    similarity: Optional[float] = None
    threshold: Optional[float] = None


@dataclass
class _Namespace:
    threshold: float
    # one record per request: similarity (nan: no candidate / exact), q, outcome (-1 none, 0 ok, 1 wrong)
    sims: deque = field(default_factory=deque)
    qs: deque = field(default_factory=deque)
    outcomes: deque = field(default_factory=deque)
    base: int = 0  # requests dropped from the window's left
    requests: int = 0
    verified: int = 0
    wrong: int = 0
    since_check: int = 0
    changes: list = field(default_factory=list)


class OnlinePolicy:
    """Per-namespace thresholds learned from verified hits (see the module docstring)."""

    def __init__(self, threshold: float, settings: Optional[OnlineSettings] = None,
                 seed: Optional[int] = None, clock=time.time):
        self.settings = settings or OnlineSettings()
        s = self.settings
        if not 0 < s.delta < 1 or not 0 < s.confidence < 1:
            raise ValueError("delta and confidence must lie in (0, 1)")
        self.initial = float(threshold)
        self.floor = float(s.floor) if s.floor is not None else self.initial - 0.05
        self._spaces: dict[str, _Namespace] = {}
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._clock = clock

    # ------------------------------------------------------------------ decisions
    @property
    def candidate_floor(self) -> float:
        """The lowest similarity any namespace could serve or explore at: the engine below the
        online policy should return candidates from here on."""
        return max(-1.0, self.floor - self.settings.explore_margin)

    def threshold(self, namespace: str = "default") -> float:
        with self._lock:
            return self._space(namespace).threshold

    def _space(self, namespace: str) -> _Namespace:
        space = self._spaces.get(namespace)
        if space is None:
            space = self._spaces[namespace] = _Namespace(self.initial)
        return space

    def sample_probability(self, similarity: float, threshold: float) -> tuple[Optional[str], float]:
        s = self.settings
        if similarity >= threshold:
            return "hit", (s.verify_near if similarity < threshold + s.near_margin else s.verify_far)
        if similarity >= threshold - s.explore_margin:
            return "shadow", s.explore
        return None, 0.0

    def decide(self, namespace: str, similarity: Optional[float], exact: bool = False) -> tuple[int, Decision]:
        """Decide one request and record it in the namespace's window; returns (request id,
        decision). ``similarity``: cosine of the nearest cached prompt (None: none); exact-tier
        repeats are served and never verified."""
        with self._lock:
            space = self._space(namespace)
            t = space.threshold
            sim = float("nan") if (similarity is None or exact or not math.isfinite(similarity)) else float(similarity)
            if exact:
                decision = Decision(True, None, 0.0, 1.0, t)
            elif math.isnan(sim):
                decision = Decision(False, None, 0.0, None, t)
            else:
                kind, q = self.sample_probability(sim, t)
                verify = kind if q > 0 and self._rng.random() < q else None
                decision = Decision(sim >= t, verify, q if kind else 0.0, sim, t)
            rid = space.base + len(space.sims)
            space.sims.append(sim)
            space.qs.append(decision.q)
            space.outcomes.append(-1)
            space.requests += 1
            while len(space.sims) > self.settings.window:
                space.sims.popleft(), space.qs.popleft(), space.outcomes.popleft()
                space.base += 1
            return rid, decision

    def record(self, namespace: str, request_id: int, wrong: bool) -> Optional[dict]:
        """The judge's verdict on a verified request; may move the threshold (returns the change,
        or None)."""
        with self._lock:
            space = self._space(namespace)
            pos = request_id - space.base
            if 0 <= pos < len(space.outcomes):
                space.outcomes[pos] = 1 if wrong else 0
            space.verified += 1
            space.wrong += int(bool(wrong))
            space.since_check += 1
            if space.since_check < self.settings.check_every:
                return None
            space.since_check = 0
            return self._update(namespace, space)

    # ------------------------------------------------------------------ the bound
    def _arrays(self, space: _Namespace):
        return (np.fromiter(space.sims, np.float64, len(space.sims)),
                np.fromiter(space.qs, np.float64, len(space.qs)),
                np.fromiter(space.outcomes, np.int8, len(space.outcomes)))

    def _bound(self, sims, qs, outcomes, t: float) -> tuple[float, float, int]:
        """(UCB, point estimate, verified) of the per-request false-hit rate at threshold t."""
        n = len(sims)
        if n == 0:
            return 1.0, 0.0, 0
        above = sims >= t  # nan compares False
        strata = np.unique(qs[above])
        if len(strata) == 0:
            return 0.0, 0.0, 0
        alpha = (1 - self.settings.confidence) / len(strata)
        ucb = est = 0.0
        verified = 0
        for q in strata:
            members = above & (qs == q)
            h = int(members.sum())
            v = int((members & (outcomes >= 0)).sum())
            w = int((members & (outcomes == 1)).sum())
            verified += v
            ucb += h / n * (clopper_pearson_upper(w, v, 1 - alpha) if v else 1.0)
            est += h / n * (w / v if v else 0.0)
        return float(ucb), float(est), verified

    def bound(self, namespace: str = "default", threshold: Optional[float] = None) -> dict:
        with self._lock:
            space = self._space(namespace)
            t = space.threshold if threshold is None else threshold
            ucb, est, verified = self._bound(*self._arrays(space), t)
            return {"threshold": t, "ucb": ucb, "estimate": est, "verified_in_window": verified,
                    "requests_in_window": len(space.sims)}

    def _update(self, namespace: str, space: _Namespace) -> Optional[dict]:
        s = self.settings
        sims, qs, outcomes = self._arrays(space)
        if int((outcomes >= 0).sum()) < s.min_verified:
            return None
        t = space.threshold
        ucb, est, verified = self._bound(sims, qs, outcomes, t)
        new = None
        if ucb > s.delta:
            grid = np.arange(t + GRID_STEP, s.ceiling + 1e-9, GRID_STEP)
            passing = [g for g in grid if self._bound(sims, qs, outcomes, g)[0] <= s.delta]
            new = float(passing[0]) if passing else min(t + s.raise_step, s.ceiling)
        else:
            low = max(self.floor, t - s.explore_margin)
            grid = np.arange(t - GRID_STEP, low - 1e-9, -GRID_STEP)
            passing = []
            for g in grid:  # fixed sequence downwards: stop at the first that fails
                if self._bound(sims, qs, outcomes, g)[0] > s.delta:
                    break
                passing.append(g)
            new = float(passing[-1]) if passing else None
        if new is None or abs(new - t) < 1e-9:
            return None
        new = round(new, 4)
        change = {"namespace": namespace, "from": t, "to": new, "ucb_before": ucb, "estimate": est,
                  "verified_in_window": verified, "requests_in_window": len(sims),
                  "after_verifications": space.verified, "at": self._clock()}
        space.threshold = new
        space.changes.append(change)
        logger.info("online policy: namespace %r threshold %.4f -> %.4f (bound %.4f vs δ %.4f, %d "
                    "verified of %d requests in the window)", namespace, t, new, ucb, s.delta,
                    verified, len(sims))
        return change

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        """Per namespace: threshold, requests, verified, wrong, the bound at the threshold, changes."""
        with self._lock:
            out = {}
            for name, space in self._spaces.items():
                b = self.bound(name)
                out[name] = {"threshold": space.threshold, "requests": space.requests,
                             "verified": space.verified, "wrong": space.wrong,
                             "false_hit_ucb": b["ucb"], "false_hit_estimate": b["estimate"],
                             "verified_in_window": b["verified_in_window"],
                             "threshold_changes": len(space.changes),
                             "last_change": space.changes[-1] if space.changes else None}
            return {"delta": self.settings.delta, "confidence": self.settings.confidence,
                    "floor": self.floor, "namespaces": out}

    def changes(self, namespace: str = "default") -> list:
        with self._lock:
            return list(self._space(namespace).changes)
