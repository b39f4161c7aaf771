"""The cache's decision rule: one definition of a hit, for the engine and every replay of it.

A lookup's candidate is the most similar entry of its scope: an exact-tier match (the same
normalised prompt) at similarity :data:`EXACT_SIMILARITY` = 1.0, else the index's nearest entry
(cosine). There is no candidate when the scope is empty or the similarity is not a finite number.
The policy's threshold decides every candidate, exact ones included: hit iff similarity ≥ threshold
(:func:`meets`). A hit served by an exact-tier match is an *exact* hit; every other hit is a
*semantic* hit. A miss stores the prompt (replacing an entry of the same normalised prompt).

:class:`raycache.cache.engine.SemanticCache` decides each lookup with :func:`decide` /
:func:`exact_hit`; the policies of :mod:`raycache.cache.policy` answer ``is_hit`` with
:func:`meets`; the simulator's vectorised replay (:mod:`raycache.simulation.replay`) and the
calibration counts decide with :func:`meets` / :func:`hits` on arrays of similarities.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

EXACT_SIMILARITY = 1.0  # the similarity of an exact-tier match, decided by the policy like any other


def meets(similarity: float, threshold: float) -> bool:
    """Scalar rule: hit iff ``similarity`` is a finite number ≥ ``threshold`` (so NaN / -inf, "no
    candidate", never hit; a +inf threshold never hits)."""
    return similarity >= threshold and math.isfinite(similarity)


def hits(similarities: Any, thresholds: Any, exact: Any = None) -> np.ndarray:
    """Vectorised :func:`meets`, broadcasting ``similarities`` against ``thresholds`` (e.g. [n]
    against [T, 1] -> [T, n] bool). ``exact`` (bool, broadcastable to ``similarities``): arrivals
    whose candidate is an exact-tier match, decided at :data:`EXACT_SIMILARITY`."""
    sims = np.asarray(similarities, np.float64)
    if exact is not None:
        sims = np.where(np.asarray(exact, bool), EXACT_SIMILARITY, sims)
    with np.errstate(invalid="ignore"):
        return np.isfinite(sims) & (sims >= np.asarray(thresholds, np.float64))


def is_candidate(similarity: Optional[float]) -> bool:
    """Whether a nearest-entry similarity names a candidate at all (None / NaN / ±inf: none)."""
    return similarity is not None and math.isfinite(similarity)


def decide(policy: Any, similarity: Optional[float]) -> Optional[bool]:
    """The policy's verdict on a semantic candidate: None when there is no candidate (see
    :func:`is_candidate`), else ``policy.is_hit(similarity)``."""
    if not is_candidate(similarity):
        return None
    return bool(policy.is_hit(similarity))


def exact_hit(policy: Any) -> bool:
    """Whether ``policy`` serves an exact-tier match (similarity :data:`EXACT_SIMILARITY`)."""
    return bool(policy.is_hit(EXACT_SIMILARITY))
