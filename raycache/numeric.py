"""Two numeric conventions, written once: unit-norm embedding rows (:func:`unit_rows`; vectors are
float32 ``[n, dim]`` and similarity is the inner product) and latency percentiles
(:func:`percentiles`), used by the cache engine, the simulator and the benchmarks."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

__all__ = ["percentiles", "unit_rows"]


def unit_rows(x, error: type[Exception] = ValueError, what: str = "vectors") -> np.ndarray:
    """float32 C-contiguous copy of ``x`` [n, dim] with every row scaled to unit L2 norm; raises
    ``error`` ("<what> must be finite and non-zero") for a non-finite or zero row."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise error(f"{what} must be finite and non-zero")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def percentiles(values: Iterable[float] | Sequence[float], qs: Sequence[int] = (50, 95, 99),
                ) -> dict[str, float]:
    """``{"p50": …, "p95": …, "p99": …}`` (one key per ``q`` of ``qs``) of non-empty ``values``,
    as Python floats in the values' unit."""
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(arr, list(qs)))}
