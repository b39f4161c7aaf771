"""Shared benchmark helpers: environment, data paths, machine facts, interleaved timing, tables, JSON.

Every benchmark times raycache and its competitor in the same process and the same run, alternating
their order each repetition (A B, B A, ...) so that load from other processes on the machine hits
both sides alike; ratios are taken per repetition, then the median is reported.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
LOAD_AT_START = os.getloadavg()[0]  # 1-minute load average when the benchmark started

if str(REPO) not in sys.path:  # run as `python bench/x.py` from a checkout without installing
    sys.path.insert(0, str(REPO))


def setup_env() -> None:
    """Offline Hugging Face, no Ray usage stats, quiet tokenizers, a short RAY_TMPDIR."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rcb-", dir="/tmp"))


def shared_data_dir() -> Path:
    """The licensed datasets beside the checkout (``../shared/data``, or $RAYCACHE_SHARED_DATA).

    They are read at run time and never copied into the repository.
    """
    path = Path(os.environ.get("RAYCACHE_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "pairs").is_dir():
        raise SystemExit(f"shared datasets not found at {path} (set RAYCACHE_SHARED_DATA to the folder "
                         f"holding pairs/ and streams/)")
    return path


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """Rows of a JSONL file (the first ``limit`` when given)."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def qqp_questions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct real questions sampled from the QQP dev pairs."""
    rows = read_jsonl(shared_data_dir() / "pairs" / "qqp_dev.jsonl")
    questions = sorted({r[k] for r in rows for k in ("prompt_a", "prompt_b")})
    pick = np.random.default_rng(seed).choice(len(questions), size=min(n, len(questions)), replace=False)
    return [questions[i] for i in pick]


def machine() -> dict[str, Any]:
    """Facts about this machine and run: cores, CPU model, memory, load, date, library versions."""
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for name in ("torch", "transformers", "sentence_transformers", "faiss", "ray", "numpy"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_gb": round(mem_gb, 1),
        "load_avg_1m_start": round(LOAD_AT_START, 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "versions": versions,
        "command": " ".join([_invocation()] + sys.argv[1:]),
    }
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def _invocation() -> str:
    script = Path(sys.argv[0]).resolve()
    return f"python -m bench.{script.stem}" if script.parent == REPO / "bench" else Path(sys.argv[0]).name


def interleaved(contenders: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Call each contender ``repeats`` times, alternating the order every repetition.

    Returns seconds per call, per contender, in repetition order.
    """
    names = list(contenders)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            contenders[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median_ratio(numerator_s: Sequence[float], denominator_s: Sequence[float]) -> float:
    """Median over repetitions of numerator/denominator (pairs the same repetition's timings)."""
    return float(np.median(np.asarray(numerator_s) / np.asarray(denominator_s)))


def latency_ms(samples_s: Iterable[float]) -> dict[str, float]:
    """p50 / p99 / mean of latencies given in seconds, returned in milliseconds."""
    ms = np.asarray(list(samples_s), dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"n": 0}
    from raycache.numeric import percentiles

    p = percentiles(ms, (50, 99))
    return {"n": int(ms.size), "p50_ms": p["p50"], "p99_ms": p["p99"], "mean_ms": float(ms.mean())}


def fmt(value: Any, digits: int = 3) -> str:
    """Table cell: floats to ``digits`` significant figures, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-markdown table (numbers right-aligned)."""
    rows = [[fmt(c) for c in row] for row in rows]
    align = ["---:" if rows and all(_numeric(r[i]) for r in rows) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    try:
        float(cell.replace(",", "").rstrip("x%"))
        return True
    except ValueError:
        return cell in ("-", "none")


def write_results(name: str, payload: Mapping[str, Any], out_dir: Path | None = None,
                  quick: bool = False) -> Path:
    """Write ``payload`` plus machine facts to ``<out_dir>/<name>.json`` (default ``bench/results``,
    or ``bench/results/quick`` for toy-size runs, which must not replace measured results)."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR / "quick" if quick else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=_jsonable))
    tmp.replace(path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
