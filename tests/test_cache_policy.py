"""Decision policies: Clopper–Pearson bound and the calibrated threshold on pairs with a known
false-hit rate."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import beta

from raycache.cache import CalibratedThreshold, SemanticCache, clopper_pearson_upper
from raycache.config import CacheConfig, ConfigError
from tests.test_cache import DIM, HashingEncoder

DELTA = 0.02


def known_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Similarity ~ U(0, 1); a pair is a false hit (label 0) with probability (1 − s)² / 2.

    Among pairs with similarity ≥ t the false-hit rate is then exactly (1 − t)² / 6.
    """
    rng = np.random.default_rng(seed)
    sims = rng.uniform(0, 1, n)
    false_hit = rng.uniform(0, 1, n) < 0.5 * (1 - sims) ** 2
    return sims, (~false_hit).astype(float)


def true_false_hit_rate(t: float) -> float:
    return (1 - t) ** 2 / 6


TRUE_THRESHOLD = 1 - math.sqrt(6 * DELTA)  # lowest t with rate ≤ δ: ≈ 0.654


def test_clopper_pearson_matches_closed_forms():
    # no failures: the bound solves (1 - p)^n = 1 - confidence
    assert clopper_pearson_upper(0, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert clopper_pearson_upper(5, 5) == 1.0
    k, n = np.array([1, 10, 50]), np.array([100, 200, 1000])
    np.testing.assert_allclose(clopper_pearson_upper(k, n, 0.9), beta.ppf(0.9, k + 1, n - k))
    assert clopper_pearson_upper(3, 100) > 3 / 100
    with pytest.raises(ValueError):
        clopper_pearson_upper(5, 4)


def test_calibrated_threshold_bounds_a_known_false_hit_rate():
    logging.disable(logging.WARNING)
    try:
        fits = [CalibratedThreshold.fit(*known_pairs(5000, seed), delta=DELTA) for seed in range(100)]
    finally:
        logging.disable(logging.NOTSET)
    thresholds = np.array([f.threshold for f in fits])
    assert np.all(np.isfinite(thresholds))
    violations = np.mean([true_false_hit_rate(t) > DELTA for t in thresholds])
    # nominal 5%; choosing the lowest qualifying threshold inflates it a little (≈ 4–7% measured)
    assert violations <= 0.10
    assert TRUE_THRESHOLD < np.median(thresholds) < TRUE_THRESHOLD + 0.15  # not absurdly conservative
    for f in fits[:5]:
        assert f.n == 5000 and 0 < f.n_above <= 5000 and f.bound <= DELTA
        assert f.false_hits_above / f.n_above <= f.bound


def test_it_is_the_lowest_threshold_whose_bound_meets_delta():
    sims, labels = known_pairs(400, seed=7)
    sims = np.round(sims, 2)  # ties: a threshold admits every pair at its similarity
    fit = CalibratedThreshold.fit(sims, labels, delta=0.05, confidence=0.9)
    qualifying = []
    for t in np.unique(sims):
        above = sims >= t
        false_hits = int(np.sum(labels[above] == 0))
        bound = 1.0 if false_hits == above.sum() else beta.ppf(0.9, false_hits + 1, above.sum() - false_hits)
        if bound <= 0.05:
            qualifying.append((t, bound, int(above.sum())))
    t, bound, n_above = min(qualifying)
    assert (fit.threshold, fit.n_above) == (t, n_above) and fit.bound == pytest.approx(bound)
    assert fit.is_hit(t) and not fit.is_hit(np.nextafter(t, -1))


def test_no_threshold_qualifies_when_false_hits_are_everywhere():
    rng = np.random.default_rng(1)
    sims = rng.uniform(0, 1, 2000)
    labels = (rng.uniform(0, 1, 2000) >= 0.10).astype(float)  # 10% false hits at every similarity
    with pytest.warns(RuntimeWarning, match="no threshold meets"):
        fit = CalibratedThreshold.fit(sims, labels, delta=DELTA)
    assert not fit.qualified and fit.threshold == math.inf and not fit.is_hit(1.0)
    assert fit.describe()["threshold"] is None  # JSON-safe
    cache = SemanticCache(HashingEncoder(), DIM, policy=fit)
    cache.store("a prompt", "r")
    assert not cache.check("a prompt here").hit


def test_soft_labels_are_read_at_one_half():
    hard = CalibratedThreshold.fit([0.9, 0.8, 0.7, 0.6] * 50, [1, 1, 0, 0] * 50, delta=0.1)
    soft = CalibratedThreshold.fit([0.9, 0.8, 0.7, 0.6] * 50, [0.9, 0.6, 0.4, 0.1] * 50, delta=0.1)
    assert hard == soft and hard.threshold == 0.8


@pytest.mark.parametrize("sims, labels, match", [
    ([0.1, 0.2], [1], "2 similarities but 1 labels"),
    ([], [], "at least one"),
    ([0.5, float("nan")], [1, 1], "finite"),
    ([0.5], [2], r"\[0, 1\]"),
])
def test_bad_calibration_input(sims, labels, match):
    with pytest.raises(ValueError, match=match):
        CalibratedThreshold.fit(sims, labels, delta=DELTA)


def test_from_config_fits_the_calibrated_policy_on_a_pair_file(tmp_path):
    words = [f"w{i}" for i in range(40)]
    rows = []
    for i in range(300):  # positives share 5 of 6 words, negatives share 2
        base = words[i % 40: i % 40 + 6] or words[:6]
        other = base[:5] + ["x"] if i % 3 else base[:2] + ["y", "z", "u", "v"]
        rows.append({"prompt_a": " ".join(base) + f" n{i}", "prompt_b": " ".join(other) + f" n{i}",
                     "label": 1.0 if i % 3 else 0.0})
    path = tmp_path / "calibration.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    cfg = CacheConfig(policy="calibrated", calibration_pairs=str(path), target_false_hit=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a qualifying threshold exists here
        cache = SemanticCache.from_config(cfg, encoder=HashingEncoder())
    described = cache.stats()["policy"]
    assert described["policy"] == "calibrated" and described["n"] == 300 and described["qualified"]
    assert described["bound"] <= 0.05
    with pytest.raises(ConfigError, match="calibration_pairs"):
        SemanticCache.from_config(CacheConfig(policy="calibrated"), encoder=HashingEncoder())
