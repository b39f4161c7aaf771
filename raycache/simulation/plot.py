"""The simulation's picture: hit rate vs false-hit rate over the threshold sweep, one curve per model."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence


def plot_hit_vs_false_hit(sweeps: Mapping[str, Sequence[dict]], delta: float, path: str | Path,
                          oracle_hit_rate: Optional[float] = None) -> Optional[Path]:
    """Write the plot (PNG, matplotlib Agg) from {model: sweep metrics}; None if nothing to plot.

    Each curve's points are the sweep's thresholds; the δ line and the oracle hit rate are drawn
    for reference, and each model's headline point (best hit rate at false-hit rate ≤ δ) is marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raycache.simulation.metrics import headline

    curves = {name: sorted((m for m in sweep if m.get("false_hit_rate") is not None),
                           key=lambda m: -(m["threshold"] or 0.0))
              for name, sweep in sweeps.items()}
    if not any(curves.values()):
        return None
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, title in ((full, "all thresholds"), (zoom, f"near δ = {delta:g}")):
        for name, points in curves.items():
            if not points:
                continue
            line, = ax.plot([m["false_hit_rate"] for m in points], [m["hit_rate"] for m in points],
                            marker=".", label=name)
            best = headline(points, delta)
            if best is not None:
                ax.plot(best["false_hit_rate"], best["hit_rate"], marker="o", markersize=9,
                        markerfacecolor="none", color=line.get_color())
                if ax is zoom:
                    ax.annotate(f"{best['hit_rate']:.3f} @ t={best['threshold']:g}",
                                (best["false_hit_rate"], best["hit_rate"]), textcoords="offset points",
                                xytext=(6, -12), fontsize=8, color=line.get_color())
        ax.axvline(delta, color="grey", linestyle="--", linewidth=1, label=f"false-hit rate δ = {delta:g}")
        if oracle_hit_rate is not None:
            ax.axhline(oracle_hit_rate, color="black", linestyle=":", linewidth=1,
                       label=f"oracle hit rate {oracle_hit_rate:.3f}")
        ax.set_xlabel("false-hit rate (false hits / arrivals)")
        ax.set_ylabel("hit rate (hits / arrivals)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    full.set_xlim(left=0)
    full.set_ylim(0, 1.01)
    _zoom_to_delta(zoom, curves, delta, oracle_hit_rate)
    zoom.legend(fontsize=8, loc="lower right")
    fig.suptitle("Semantic cache replay: hit rate vs false-hit rate (one point per threshold)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _zoom_to_delta(ax, curves: Mapping[str, Sequence[dict]], delta: float,
                   oracle_hit_rate: Optional[float]) -> None:
    """x in [0, 3δ]; y spanning the hit rates of the points shown (and the oracle)."""
    x_max = 3 * delta
    shown = [m["hit_rate"] for points in curves.values() for m in points
             if m["false_hit_rate"] <= x_max]
    if oracle_hit_rate is not None:
        shown.append(oracle_hit_rate)
    ax.set_xlim(0, x_max)
    if shown:
        low, high = min(shown), max(shown)
        pad = max(0.02, 0.1 * (high - low))
        ax.set_ylim(max(0.0, low - pad), min(1.01, high + pad))
