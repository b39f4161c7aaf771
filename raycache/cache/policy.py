"""Decision policies: is the most similar cached prompt close enough to reuse its response?

* :class:`StaticThreshold` — hit iff cosine ≥ a fixed threshold.
* :class:`PolicyThreshold` — the threshold of a policy file written by ``raycache calibrate``
  (:mod:`raycache.calibration`), chosen on a replayed labelled stream so that the per-request
  false-hit rate (``bound: per_request``: wrong cached answers / all requests) has an upper
  confidence bound ≤ δ, by fixed-sequence testing (valid across every threshold tried).
* :class:`CalibratedThreshold` — ``bound: among_hits``, fitted from labelled calibration *pairs*:
  the lowest threshold whose one-sided Clopper–Pearson bound on the share of wrong hits among pairs
  at or above it is at most δ.

Every policy here is a threshold: ``is_hit`` is the one rule of :mod:`raycache.cache.decision`.

Two meanings of δ, explicitly named: ``per_request`` bounds P(a request is answered from the cache
with a response that does not answer it); ``among_hits`` bounds P(wrong | answered from the cache).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Protocol, Sequence

import numpy as np
from scipy.stats import beta

from raycache.cache.decision import meets

logger = logging.getLogger(__name__)


class DecisionPolicy(Protocol):
    threshold: float

    def is_hit(self, similarity: float) -> bool: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class StaticThreshold:
    """Hit iff cosine similarity ≥ ``threshold``."""

    threshold: float

    def is_hit(self, similarity: float) -> bool:
        return meets(similarity, self.threshold)

    def describe(self) -> dict:
        return {"policy": "static", "threshold": self.threshold}


def clopper_pearson_upper(failures, trials, confidence: float = 0.95):
    """One-sided Clopper–Pearson upper bound on a binomial rate: P(rate ≤ bound) ≥ confidence.

    Vectorised over ``failures``/``trials`` (arrays of equal shape, trials ≥ 1). The bound is 1 when
    every trial failed.
    """
    k = np.asarray(failures, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= failures <= trials and trials >= 1")
    upper = np.ones_like(k)
    some = k < n
    upper[some] = beta.ppf(confidence, k[some] + 1, n[some] - k[some])
    return upper if upper.ndim else float(upper)


@dataclass
class PolicyThreshold:
    """Hit iff cosine ≥ ``threshold``, a threshold loaded from a calibrated policy file (+inf: never
    hits semantically). ``meta``: what the file says about it (δ, bound kind, UCB, sample sizes,
    model, path), reported by :meth:`describe`."""

    threshold: float
    meta: dict = field(default_factory=dict)

    def is_hit(self, similarity: float) -> bool:
        return meets(similarity, self.threshold)

    def describe(self) -> dict:
        return {"policy": "file", **self.meta,
                "threshold": self.threshold if math.isfinite(self.threshold) else None}


@dataclass(frozen=True)
class CalibratedThreshold:
    """A threshold with a stated bound on its false-hit rate *among hits* (``bound: among_hits``;
    build it with :meth:`fit`). For a per-request budget, use ``raycache calibrate`` instead.

    ``bound``: the upper confidence bound on P(pair cannot share a response | similarity ≥
    threshold) among the calibration pairs; ``n``: calibration pairs; ``n_above``: pairs at or above
    the threshold, ``false_hits_above`` of them negative. ``threshold`` is +inf (never hit) when no
    threshold meets δ.
    """

    threshold: float
    delta: float
    confidence: float
    bound: Optional[float]
    n: int
    n_above: int
    false_hits_above: int

    @property
    def qualified(self) -> bool:
        return math.isfinite(self.threshold)

    def is_hit(self, similarity: float) -> bool:
        return meets(similarity, self.threshold)

    def describe(self) -> dict:
        """JSON-safe summary (threshold None when no threshold qualified)."""
        return {"policy": "calibrated", "bound_kind": "among_hits", **asdict(self),
                "qualified": self.qualified,
                "threshold": self.threshold if self.qualified else None}

    @classmethod
    def fit(cls, similarities: Sequence[float], labels: Sequence[float], delta: float,
            confidence: float = 0.95) -> "CalibratedThreshold":
        """The lowest threshold t whose bound on the false-hit rate among pairs with similarity ≥ t
        is ≤ ``delta``.

        ``similarities``: cosine of each calibration pair, [n]. ``labels``: 1 when the pair can share
        one response (soft teacher labels are read as ≥ 0.5), 0 when a hit would be false. Candidate
        thresholds are the observed similarities; ties are kept together (a threshold admits every
        pair at that similarity).

        The bound is pointwise (it holds for each threshold on its own); picking the lowest
        qualifying one among many candidates costs a little confidence: on synthetic pairs with a
        known rate the chosen threshold exceeded δ in 8.5% of runs with 2,000 pairs and 4% with
        5,000, at a nominal 5%.
        """
        sims = np.asarray(similarities, dtype=np.float64).reshape(-1)
        labs = np.asarray(labels, dtype=np.float64).reshape(-1)
        if len(sims) != len(labs):
            raise ValueError(f"{len(sims)} similarities but {len(labs)} labels")
        if len(sims) == 0:
            raise ValueError("calibration needs at least one labelled pair")
        if not np.all(np.isfinite(sims)):
            raise ValueError("similarities must be finite numbers")
        if not np.all((labs >= 0) & (labs <= 1)):
            raise ValueError("labels must lie in [0, 1] (1 = the pair can share a response)")
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {confidence}")

        order = np.argsort(-sims, kind="stable")
        sorted_sims = sims[order]
        negatives = np.cumsum(labs[order] < 0.5)
        # candidate k admits the first ends[k] + 1 pairs: the end of each run of tied similarities
        ends = np.flatnonzero(np.r_[sorted_sims[1:] != sorted_sims[:-1], True])
        above = ends + 1
        false_hits = negatives[ends]
        bounds = clopper_pearson_upper(false_hits, above, confidence)
        ok = np.flatnonzero(bounds <= delta)
        if len(ok) == 0:
            message = (f"no threshold meets a false-hit bound of {delta:g} at {confidence:.0%} "
                       f"confidence on {len(sims)} calibration pairs (best bound {bounds.min():.4f}); "
                       f"the calibrated policy will never hit. Use more calibration pairs, a larger "
                       f"delta, or a better encoder.")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            logger.warning(message)
            return cls(threshold=math.inf, delta=delta, confidence=confidence, bound=None,
                       n=len(sims), n_above=0, false_hits_above=0)
        best = ok[-1]  # ends are in decreasing similarity: the last qualifying is the lowest
        return cls(threshold=float(sorted_sims[ends[best]]), delta=delta, confidence=confidence,
                   bound=float(bounds[best]), n=len(sims), n_above=int(above[best]),
                   false_hits_above=int(false_hits[best]))
