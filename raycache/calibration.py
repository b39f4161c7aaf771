"""Calibrating the cache threshold for a per-request false-hit budget (``raycache calibrate``).

What δ means (``bound``):

* ``per_request`` (the default): P(a request is answered from the cache with a response that does
  not answer it) ≤ δ. The rate's denominator is *every arrival*, hits and misses alike: it is the
  share of users who get a wrong cached answer, the budget users state.
* ``among_hits``: P(the answer is wrong | the request was answered from the cache) ≤ δ, i.e. the
  share of wrong hits among hits. This is what :class:`raycache.cache.policy.CalibratedThreshold`
  bounds on a labelled *pair* file (``cache.policy: calibrated``); here it is measured on the replayed
  stream instead. It is much stricter in practice: a threshold that serves few hits, a quarter of
  them wrong, passes ``per_request`` but not ``among_hits``.

How the threshold is chosen (:func:`fixed_sequence`). The labelled calibration stream is replayed in
arrival order with the engine's decision rule (the offline simulator's sweep,
:func:`raycache.simulation.replay.replay_sweep`: look up, hit when the nearest stored prompt of the
scope has cosine ≥ t or the normalised text is stored, store on a miss) once per candidate threshold
t. For each t that gives n_t trials and k_t failures (``per_request``: n_t = arrivals, k_t = false
hits; ``among_hits``: n_t = hits, k_t = false hits), and the one-sided Clopper–Pearson upper bound

    UCB_t = Beta⁻¹(1 − α; k_t + 1, n_t − k_t)        (α = 1 − confidence; UCB_t = 1 when k_t = n_t)

satisfies P(p_t ≤ UCB_t) ≥ 1 − α for the true rate p_t. The thresholds are then tested in a fixed
order, from the highest to the lowest: test H_t: p_t > δ, reject it when UCB_t ≤ δ, and stop at the
first threshold that is not rejected. The chosen threshold t̂ is the lowest one rejected (None when the
first fails: the policy never hits semantically).

Why this is valid across the many thresholds tried (fixed-sequence testing; Learn-then-Test,
Angelopoulos et al. 2021, with the fixed-sequence family-wise procedure): the order is fixed before
the labels are seen, and each test has level α. Let t* be the first threshold in the order whose
null is true (p_t* > δ). The procedure can only return a threshold with p > δ if it rejects H_t*, and
reaching t* needs nothing else that could fail, so

    P(p_t̂ > δ) ≤ P(reject H_t*) = P(UCB_t* ≤ δ) ≤ P(UCB_t* < p_t*) ≤ α,

whatever the number of thresholds. No Bonferroni correction is needed, so a fine grid costs nothing.
(Picking the lowest threshold whose pointwise bound passes *anywhere* in the grid, as the pair
calibration does, has no such guarantee: measured 8.5% failures at a nominal 5%.)

What the guarantee assumes. The binomial bound treats the calibration arrivals' outcomes as
exchangeable draws from the traffic the policy will serve. In a replay they are dependent through the
cache (what is stored depends on earlier arrivals), and the per-request false-hit rate grows with the
cache's size; so calibrate on a stream like production traffic and of a similar length (or a sliding
window of it), and verify online. Measured on QQP (bench/README.md §4b): false hits come from pairs
of look-alike groups, so they are correlated across arrivals, and two group-disjoint halves of one
stream differed by more than the binomial bound allows (at δ = 2%, 95%: the test half exceeded δ in 3
of 6 splits, by at most 0.25 points; at 99% in 1 of 6). So by default (``clusters="confusion"``) each
threshold's trials and failures are divided by a design effect d_t ≥ 1 (:func:`design_effect`: the
cluster-robust variance of the false-hit rate over the binomial one, clusters = groups joined by the
false hits between them at that threshold), i.e. the bound is computed on Kish's effective sample
size. This is an approximation (d_t is estimated from the same stream), not an exact guarantee; it
is 1 for independent arrivals, so the coverage there is unchanged. For ``among_hits`` the sequence starts at the highest threshold
with enough hits for a zero-failure test to pass at all (n ≥ ln α / ln(1 − δ)); that start depends on
the similarities only, not the labels, so the argument above holds conditionally on them.

A policy file (:class:`PolicyFile`, JSON) records the threshold, δ, confidence, bound kind, the UCB at
the threshold, the sample sizes, the tested sequence, and the model it was fitted for (its path and a
fingerprint of its folder: :func:`model_identity`). ``simulate --policy`` and ``serve --policy-file``
load it with :func:`load_policy`, which refuses a policy fitted for another model; nothing is
refitted at start-up.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from raycache.cache.decision import hits as rule_hits
from raycache.cache.policy import clopper_pearson_upper
from raycache.config import ConfigError
from raycache.policy_file import (  # noqa: F401  (re-exported: calibration's public names, as before)
    BOUNDS,
    EDGE_BYTES,
    POLICY_FORMAT,
    SKIPPED_FILES,
    SMALL_FILE_BYTES,
    PolicyFile,
    load_policy,
    model_fingerprint,
    model_identity,
)

logger = logging.getLogger(__name__)


def calibration_thresholds() -> list[float]:
    """The default grid of candidate thresholds: 0.300 … 0.995 in steps of 0.005 (fixed-sequence
    testing pays nothing for a fine grid; the replay's cost grows with its length)."""
    return [round(0.30 + 0.005 * i, 4) for i in range(140)]


# ----------------------------------------------------------------------------- per-threshold counts
@dataclass
class ThresholdCounts:
    """Outcome of replaying one stream under each threshold; arrays share the thresholds' order
    (descending: the order fixed-sequence testing uses).

    ``arrivals``: stream length; ``hits``, ``exact_hits``, ``correct_hits``, ``false_hits``,
    ``unknown_hits`` [T] int64 (unknown: hits whose correctness the stream cannot tell; counted as
    false by the bounds); ``exact_correct_hits``: correct hits answered by the exact tier;
    ``design_effect`` [T] float ≥ 1 or None: variance inflation of the false-hit rate from correlated
    arrivals (:func:`design_effect`).
    """

    thresholds: np.ndarray
    arrivals: int
    hits: np.ndarray
    exact_hits: np.ndarray
    correct_hits: np.ndarray
    false_hits: np.ndarray
    unknown_hits: np.ndarray
    exact_correct_hits: Optional[np.ndarray] = None
    design_effect: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.exact_correct_hits is None:
            self.exact_correct_hits = np.asarray(self.exact_hits, np.int64).copy()

    def trials_and_failures(self, bound: str, effective: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(trials, failures) [T] per threshold for ``bound``; with a ``design_effect`` d_t and
        ``effective``, both divided by d_t (Kish's effective sample size: same rate, wider bound)."""
        failures = self.false_hits + self.unknown_hits
        if bound == "per_request":
            trials = np.full(len(self.thresholds), self.arrivals, np.int64)
        elif bound == "among_hits":
            trials = self.hits.astype(np.int64)
        else:
            raise ConfigError(f"bound must be one of {BOUNDS}, got {bound!r}")
        if self.design_effect is None or not effective:
            return trials, failures
        return trials / self.design_effect, failures / self.design_effect

    def row(self, i: int) -> dict:
        n = self.arrivals
        semantic = int(self.hits[i] - self.exact_hits[i])
        return {"threshold": float(self.thresholds[i]), "arrivals": n, "hits": int(self.hits[i]),
                "exact_hits": int(self.exact_hits[i]), "semantic_hits": semantic,
                "correct_hits": int(self.correct_hits[i]), "false_hits": int(self.false_hits[i]),
                "unknown_hits": int(self.unknown_hits[i]),
                "hit_rate": self.hits[i] / n if n else None,
                "correct_hit_rate": self.correct_hits[i] / n if n else None,
                "false_hit_rate": self.false_hits[i] / n if n else None}


def counts_from_outcomes(similarity: np.ndarray, wrong: np.ndarray, thresholds: Sequence[float],
                         exact: Optional[np.ndarray] = None) -> ThresholdCounts:
    """Counts when each arrival's best match does not depend on the threshold (synthetic streams,
    tests): arrival i hits under t iff ``similarity[i]`` ≥ t (an ``exact[i]`` one at similarity 1:
    :func:`raycache.cache.decision.hits`), and a hit is false
    iff ``wrong[i]``. ``similarity``/``wrong``/``exact`` [n]."""
    sims = np.asarray(similarity, np.float64)
    wrong = np.asarray(wrong, bool)
    exact = np.zeros(len(sims), bool) if exact is None else np.asarray(exact, bool)
    ts = np.sort(np.asarray(thresholds, np.float64))[::-1]
    hit = rule_hits(sims[None, :], ts[:, None], exact[None, :])  # the engine's rule, [T, n]
    false = (hit & wrong[None, :] & ~exact[None, :]).sum(axis=1)
    hits = hit.sum(axis=1)
    return ThresholdCounts(ts, len(sims), hits, np.full(len(ts), int(exact.sum())), hits - false,
                           false, np.zeros(len(ts), np.int64))


CLUSTERINGS = ("confusion", "group", "none")


def design_effect(failed: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Variance inflation of a failure rate whose arrivals fail together within clusters.

    ``failed`` [T, n] bool (per threshold, per arrival), ``clusters`` [n] int ids. With k_c failures
    among the n_c arrivals of cluster c, p = k / n and C clusters, the cluster-robust variance of p is

        V_cl = C / (C − 1) · Σ_c (k_c − p·n_c)² / n²,

    and the design effect d = max(1, V_cl / (p(1 − p) / n)) [T] (1 where p is 0 or 1, or C < 2).
    Dividing trials and failures by d gives the binomial bound the variance of correlated data.
    """
    failed = np.atleast_2d(np.asarray(failed, bool))
    codes, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    n, c = failed.shape[1], len(codes)
    out = np.ones(failed.shape[0])
    if n == 0 or c < 2:
        return out
    n_c = np.bincount(inverse, minlength=c).astype(np.float64)
    for t in range(failed.shape[0]):
        k_c = np.bincount(inverse, weights=failed[t].astype(np.float64), minlength=c)
        p = k_c.sum() / n
        if 0 < p < 1:
            v_cluster = c / (c - 1) * np.square(k_c - p * n_c).sum() / n ** 2
            out[t] = max(1.0, v_cluster / (p * (1 - p) / n))
    return out


def arrival_groups(stream) -> np.ndarray:
    """Dense int code [n] of each arrival's group (``group`` column; for streams labelled by
    ``answers``, its distinct answer set); an arrival without a label is its own group."""
    if "group" in stream.columns:
        labels = stream["group"].tolist()
    else:
        labels = [repr(sorted(map(str, a))) if isinstance(a, (list, tuple, np.ndarray)) else None
                  for a in stream["answers"].tolist()]
    keys = [f"label:{g}" if g is not None and g == g else f"row:{i}" for i, g in enumerate(labels)]
    return np.unique(np.asarray(keys, dtype=object), return_inverse=True)[1].astype(np.int64)


def failure_clusters(groups: np.ndarray, decision, verdict: np.ndarray, clusters: str) -> Optional[np.ndarray]:
    """Cluster id [n] of each arrival under one threshold's replay, for :func:`design_effect`, or
    None (``clusters='none'``). ``groups``: :func:`arrival_groups`; ``decision`` / ``verdict``: that
    replay's decisions and :func:`hit_correctness`.

    ``group``: the arriving prompt's group (its arrivals share a response, so share mistakes).
    ``confusion``: groups also joined whenever an arrival of one is answered with another's
    response — false hits come from *pairs* of look-alike groups, so the arrivals of both fail
    together.
    """
    if clusters not in CLUSTERINGS:
        raise ConfigError(f"clusters must be one of {CLUSTERINGS}, got {clusters!r}")
    if clusters == "none":
        return None
    if clusters == "group":
        return groups
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    wrong = np.flatnonzero(verdict == 0)
    origin = decision.matched_row[wrong]
    wrong, origin = wrong[origin >= 0], origin[origin >= 0]
    g = int(groups.max()) + 1 if len(groups) else 0
    graph = coo_matrix((np.ones(len(wrong)), (groups[wrong], groups[origin])), shape=(g, g))
    return connected_components(graph, directed=False)[1][groups]


def stream_counts(stream, vectors: np.ndarray, thresholds: Optional[Sequence[float]] = None,
                  cache=None, replay: str = "auto", chunk_size: Optional[int] = None,
                  times: Optional[np.ndarray] = None, clusters: str = "confusion") -> ThresholdCounts:
    """Replay a labelled stream (``prompt`` + ``group`` or ``answers``, optional ``namespace``) with
    the engine's decision rule under every threshold -> :class:`ThresholdCounts`.

    The replay is the offline simulator's (:func:`raycache.simulation.replay.replay_sweep`: the
    vectorized replay where exact, the engine one arrival at a time otherwise) and correctness is
    the simulator's (:func:`raycache.simulation.metrics.hit_correctness`). ``vectors`` [n, dim];
    ``cache``: the :class:`CacheConfig` to reproduce (default: unbounded, exact tier on);
    ``clusters``: how arrivals are grouped for the design effect (:func:`failure_clusters`).
    """
    from raycache.config import CacheConfig
    from raycache.data import DataError
    from raycache.simulation.metrics import correctness_mode, hit_correctness
    from raycache.simulation.replay import DEFAULT_CHUNK, ReplayStream, replay_sweep

    mode = correctness_mode(stream)
    if mode == "unknown":
        raise DataError("calibration needs a labelled stream: a 'group' column (arrivals in one "
                        "group share a response) or an 'answers' column")
    cache = cache if cache is not None else CacheConfig(capacity=None)
    ts = sorted({float(t) for t in (thresholds or calibration_thresholds())}, reverse=True)
    replay_stream = ReplayStream.from_frame(stream, vectors)
    decisions, _ = replay_sweep(replay_stream, cache, ts, replay, chunk_size or DEFAULT_CHUNK, times)
    out = {k: np.zeros(len(ts), np.int64)
           for k in ("hits", "exact", "correct", "false", "unknown", "exact_correct")}
    verdicts = {t: hit_correctness(stream, decisions[t], mode) for t in ts}
    for i, t in enumerate(ts):
        verdict = verdicts[t]
        out["exact_correct"][i] = int((verdict[decisions[t].exact] == 1).sum())
        out["hits"][i] = int(decisions[t].hit.sum())
        out["exact"][i] = int(decisions[t].exact.sum())
        out["correct"][i] = int((verdict == 1).sum())
        out["false"][i] = int((verdict == 0).sum())
        out["unknown"][i] = int((verdict == -1).sum())
    deff = None
    if clusters not in CLUSTERINGS:
        raise ConfigError(f"clusters must be one of {CLUSTERINGS}, got {clusters!r}")
    if clusters != "none":
        groups = arrival_groups(stream)
        deff = np.array([design_effect(((verdicts[t] == 0) | (verdicts[t] == -1))[None, :],
                                       failure_clusters(groups, decisions[t], verdicts[t], clusters))[0]
                         for t in ts])
    return ThresholdCounts(np.array(ts), len(stream), out["hits"], out["exact"], out["correct"],
                           out["false"], out["unknown"], out["exact_correct"], deff)


# ----------------------------------------------------------------------------- threshold selection
@dataclass
class Selection:
    """The threshold a rule chose (``index`` into the counts, None: no threshold qualifies) and the
    evidence: ``ucb`` [T] (NaN where not computed), ``tested``: how many thresholds were tested."""

    rule: str
    index: Optional[int]
    threshold: Optional[float]
    ucb: np.ndarray
    tested: int


def min_trials_to_pass(delta: float, confidence: float) -> int:
    """The fewest trials for which zero failures give a Clopper–Pearson bound ≤ δ:
    n ≥ ln(1 − confidence) / ln(1 − δ)."""
    return int(math.ceil(math.log(1 - confidence) / math.log(1 - delta) - 1e-12))


def realised_upper(failures, trials, confidence: float, horizon: int, design: float = 1.0) -> float:
    """Upper bound on the *realised* failure rate over the next ``horizon`` requests.

    With α = 1 − confidence, the rate's bound p⁺ = UCB_{1−α/2}(k, n) (Clopper–Pearson on the
    calibration trials), and m = ``horizon`` / ``design`` effective future trials, the bound is the
    upper α/2 quantile of Binomial(m, p⁺) over m. By the union bound, P(realised rate > bound) ≤ α/2
    (p > p⁺) + α/2 (a Binomial(m, p) draw above that quantile, p ≤ p⁺): the future sample's own
    spread is paid for, which a bound on the population rate alone leaves out (a finite test half of
    9,587 QQP arrivals has a standard deviation of 0.14 points at a 2% rate)."""
    from scipy.stats import binom

    alpha = 1.0 - confidence
    p_up = clopper_pearson_upper(float(failures), float(trials), 1.0 - alpha / 2) if trials >= 1 else 1.0
    m = max(1, int(horizon / max(design, 1.0)))
    return float(binom.ppf(1.0 - alpha / 2, m, p_up)) / m


def fixed_sequence(counts: ThresholdCounts, delta: float, confidence: float = 0.95,
                   bound: str = "per_request", horizon: Optional[int] = None) -> Selection:
    """Fixed-sequence testing from the highest threshold down; stop at the first failure (see the
    module docstring for the procedure, the formula and why it is valid across all thresholds).

    ``horizon``: None bounds the rate of the traffic (the population rate); an int M bounds the
    realised rate over the next M requests instead (:func:`realised_upper`; ``per_request`` only),
    a stricter test for a finite window such as a day's traffic or a held-out test stream."""
    _check_delta(delta, confidence)
    if horizon is not None and (bound != "per_request" or horizon < 1):
        raise ConfigError(f"horizon needs bound='per_request' and at least 1 request, got "
                          f"horizon={horizon!r}, bound={bound!r}")
    trials, failures = counts.trials_and_failures(bound)
    design = counts.design_effect if counts.design_effect is not None else np.ones(len(trials))
    ucb = np.full(len(trials), np.nan)
    start = 0
    if bound == "among_hits":  # label-independent start: the first test that could pass at all
        enough = np.flatnonzero(trials >= min_trials_to_pass(delta, confidence))
        start = int(enough[0]) if len(enough) else len(trials)
    chosen, tested = None, 0
    for i in range(start, len(trials)):
        tested += 1
        if horizon is not None:
            ucb[i] = realised_upper(failures[i], trials[i], confidence, horizon, float(design[i]))
        else:
            ucb[i] = clopper_pearson_upper(float(failures[i]), float(trials[i]), confidence) if trials[i] >= 1 else 1.0
        if ucb[i] > delta:
            break
        chosen = i
    return Selection("fixed_sequence", chosen, None if chosen is None else float(counts.thresholds[chosen]),
                     ucb, tested)


def empirical_rule(counts: ThresholdCounts, delta: float, bound: str = "per_request") -> Selection:
    """The plain rule: the lowest threshold whose *empirical* rate (failures / trials) is ≤ δ. No
    confidence: about half the time its true rate exceeds δ when the curve crosses δ there."""
    trials, failures = counts.trials_and_failures(bound)
    rate = np.where(trials > 0, failures / np.maximum(trials, 1), 0.0 if bound == "among_hits" else 1.0)
    ok = np.flatnonzero(rate <= delta + 1e-12)
    chosen = int(ok[-1]) if len(ok) else None  # thresholds descend: the last one is the lowest
    return Selection("empirical", chosen, None if chosen is None else float(counts.thresholds[chosen]),
                     np.full(len(trials), np.nan), len(trials))


def _check_delta(delta: float, confidence: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError(f"the target false-hit rate must lie in (0, 1), got {delta}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence}")


def fit_policy(counts: ThresholdCounts, delta: float, confidence: float = 0.95,
               bound: str = "per_request", model: Optional[str] = None,
               stream: Optional[str] = None, max_length: Optional[int] = None,
               horizon: Optional[int] = None) -> PolicyFile:
    """Fixed-sequence selection on ``counts`` -> the :class:`PolicyFile` (not yet written)."""
    selection = fixed_sequence(counts, delta, confidence, bound, horizon)
    trials, failures = counts.trials_and_failures(bound)
    raw_trials, raw_failures = counts.trials_and_failures(bound, effective=False)
    deff = counts.design_effect if counts.design_effect is not None else np.ones(len(trials))
    tested = [{"threshold": float(counts.thresholds[i]), "trials": int(raw_trials[i]),
               "failures": int(raw_failures[i]), "design_effect": round(float(deff[i]), 4),
               "ucb": float(selection.ucb[i])}
              for i in range(len(trials)) if not math.isnan(selection.ucb[i])]
    i = selection.index
    return PolicyFile(
        threshold=selection.threshold, delta=delta, confidence=confidence, bound=bound,
        ucb=None if i is None else float(selection.ucb[i]), n_arrivals=counts.arrivals,
        n_hits=0 if i is None else int(counts.hits[i]),
        n_false_hits=0 if i is None else int(counts.false_hits[i]),
        n_unknown_hits=0 if i is None else int(counts.unknown_hits[i]),
        model=model_identity(model), stream=stream,
        created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        thresholds_tried=len(counts.thresholds), tested=tested, max_length=max_length,
        horizon=horizon)


# ----------------------------------------------------------------------------- the job
def resolve_horizon(horizon: Optional[int], bound: str, arrivals: int) -> Optional[int]:
    """The window (requests) a calibrate run bounds: ``horizon`` as configured, 0 = the
    calibration stream's ``arrivals``; None for the long-run rate and for the among-hits bound."""
    if horizon is None or bound != "per_request":
        return None
    return arrivals if horizon == 0 else horizon


def run(cfg) -> dict:
    """``raycache calibrate``: replay ``cfg.stream`` under every candidate threshold, choose by
    fixed-sequence testing, write the policy file ``cfg.out``; returns a summary."""
    from raycache.simulation.embed import embed_stream, ensure_ray, load_embeddings, resolve_model
    from raycache.simulation.replay import arrival_times, read_stream_frame

    started = time.perf_counter()
    stream = read_stream_frame(cfg)
    model = resolve_model(cfg.encoder.model)
    if cfg.embeddings:
        vectors = load_embeddings(cfg.embeddings, len(stream))
    else:
        ensure_ray()
        out = Path(cfg.out)
        vectors = embed_stream(stream["prompt"].astype(str).tolist(),
                               cfg.encoder.model_copy(update={"model": model}),
                               out.with_name(out.stem + ".embeddings.npy"))
    counts = stream_counts(stream, vectors, cfg.thresholds or None, cfg.cache, cfg.replay,
                           times=arrival_times(stream, None), clusters=cfg.clusters)
    policy = fit_policy(counts, cfg.target_false_hit, cfg.confidence, cfg.bound, model,
                        cfg.stream, cfg.encoder.max_length, resolve_horizon(cfg.horizon, cfg.bound, len(stream)))
    path = policy.write(cfg.out)
    if policy.qualified:
        logger.info("calibrated threshold %.4f: %s false-hit bound %.4f <= %g at %.0f%% confidence "
                    "(%d arrivals, %d hits, %d false)", policy.threshold, policy.bound, policy.ucb,
                    policy.delta, 100 * policy.confidence, policy.n_arrivals, policy.n_hits,
                    policy.n_false_hits)
    else:
        logger.warning("no threshold meets a %s false-hit bound of %g on %d arrivals; the policy "
                       "never hits semantically", policy.bound, policy.delta, policy.n_arrivals)
    summary = {k: v for k, v in policy.to_dict().items() if k != "tested"}
    at = int(np.flatnonzero(counts.thresholds == policy.threshold)[0]) if policy.qualified else None
    return {**summary, "policy_file": str(path), "qualified": policy.qualified,
            "at_threshold": counts.row(at) if at is not None else None,
            "seconds": round(time.perf_counter() - started, 3)}
