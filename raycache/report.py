"""The pipeline's report: report.md and report.html (plots inline), from files the run wrote.

Nothing here computes a figure: every number is read from the stage outputs (``stages.json``,
``eval/metrics.json``, ``simulation/simulation.json``, ``train_*/train_metrics.json``).
"""

from __future__ import annotations

import base64
import html
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import os

from raycache.io import write_text_atomic


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def machine() -> str:
    """A one-line description of this machine (for dating results)."""
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # pragma: no cover
        gpu = "no GPU"
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {gpu}, Python {platform.python_version()}"


def _pct(v: Any) -> str:
    return "" if v is None else f"{100.0 * v:.1f}%"


def _operating_rows(operating: dict) -> list[list[Any]]:
    rows = []
    for name, op in operating.items():
        t = op.get("test") or {}
        best = op.get("best_on_test") or {}
        rows.append([name, _fmt(op.get("threshold")), op.get("rule") or "", _pct(t.get("correct_hit_rate")),
                     _pct(t.get("false_hit_rate")), _pct(t.get("semantic_correct_hit_rate")),
                     _pct(t.get("exact_hit_rate")), _pct(best.get("correct_hit_rate"))])
    return rows


def _stage_detail(stage: str, result: dict) -> str:
    r = result or {}
    if stage == "mine" and r:
        return f"embedding {r.get('embed_seconds')} s ({r.get('prompts_per_s')} prompts/s)"
    if stage == "train" and r:
        return "; ".join(f"{loss} {_fmt(v.get('wall_s'), 0)} s" for loss, v in r.items() if isinstance(v, dict))
    if stage == "live" and r:
        return (f"service start-up {r.get('startup_s')} s, replay {r.get('wall_seconds')} s "
                f"({r.get('throughput_arrivals_per_s')} arrivals/s)")
    return ""


def build_markdown(lay, stages: dict, cfg, total_s: float) -> tuple[str, list[Path]]:
    """The report text and the plot files it refers to."""
    delta = cfg.delta
    parts = [f"# raycache pipeline report\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · "
             f"{machine()} · total {total_s / 60:.1f} min · {'quick' if cfg.quick else 'full'} run · "
             f"teacher {getattr(cfg, 'teacher', 'reference')}\n"]
    sim_stage = stages.get("simulate", {}).get("result", {}) or {}
    operating = sim_stage.get("operating") or _read(lay.sim / "operating.json")
    if operating:
        parts.append(
            f"## Headline: correct-hit rate at false-hit rate ≤ {delta:g} (test stream)\n\n"
            "The threshold is chosen on the val split's stream (`stream_val.jsonl`: other entities than the "
            "test split) and read on the test stream, per arrival. *Semantic* hits are hits on a different "
            "wording; *exact repeats* are answered by the exact tier whatever the encoder. The last column "
            "is the best threshold chosen on the test stream itself: an upper bound, not a method.\n\n"
            + _table(["model", "threshold", "chosen by", "correct-hit rate", "false-hit rate",
                      "semantic correct-hit rate", "exact-repeat hit rate", "best on test (bound)"],
                     _operating_rows(operating)))
    parts.append("## Stages\n\n" + _table(["stage", "seconds", "detail"],
                                            [[k, _fmt(v["seconds"], 1), _stage_detail(k, v.get("result"))]
                                             for k, v in stages.items()]))
    gen = stages.get("generate", {}).get("result", {})
    mine = stages.get("mine", {}).get("result", {})
    label = stages.get("label", {}).get("result", {})
    if gen or mine or label:
        parts.append("## Data\n\n" + _table(["what", "value"], [
            ["prompts (all / train / val / test split)",
             f"{gen.get('prompts')} / {gen.get('train_prompts')} / {gen.get('val_prompts')} / {gen.get('test_prompts')}"],
            ["groups (distinct answers)", gen.get("groups")],
            ["val/test phrasings held out from training", gen.get("holdout_phrasings")],
            ["mined pairs (kNN / random)", f"{mine.get('knn_pairs')} / {mine.get('random_pairs')}"],
            ["labelled pairs, positive rate", f"{label.get('labelled')}, {_fmt(label.get('positive_rate'))}"],
            ["teacher", f"{label.get('teacher', '')} {label.get('teacher_model') or ''}".strip()],
            ["teacher errors", label.get("errors")],
        ]))
    plots: list[Path] = []
    rows = []
    for loss in cfg.losses:
        tm = _read(lay.train_dir(loss) / "train_metrics.json")
        if tm:
            epochs = tm.get("epochs") or []
            last = epochs[-1] if epochs else {}
            base = tm.get("base") or {}
            rows.append([loss, tm.get("n_train_pairs"), base.get("auc"), tm.get("best_val_auc"),
                         _fmt(last.get("pairs_per_s"), 1), _fmt(tm.get("wall_s"), 0)])
            if (lay.train_dir(loss) / "training.png").exists():
                plots.append(lay.train_dir(loss) / "training.png")
    if rows:
        parts.append("## Fine-tuning (validation = the val split's hard pairs: entities held out from training)\n\n"
                     + _table(["loss", "pairs", "val AUC before", "best val AUC", "pairs/s", "seconds"], rows))
    metrics = _read(lay.eval / "metrics.json")
    if metrics:
        parts.append("## Evaluation on the test split's hard pairs (entities and phrasings unseen in training)\n\n"
                     + _table(["model", "ROC-AUC", "average precision", "best F1", "at threshold"],
                              [[name, m["auc"], m["average_precision"], m["best_f1"], m["best_f1_threshold"]]
                               for name, m in metrics.items()]))
        plots += [lay.eval / "roc.png", lay.eval / "pr.png"]
    sim = _read(lay.sim / "simulation.json")
    if sim.get("models"):
        rows = []
        for name, entry in sim["models"].items():
            h = entry.get("headline", {}) or {}
            at = next((m for m in entry.get("sweep") or [] if m.get("threshold") == h.get("threshold")), {})
            exact = at.get("exact_hits")
            arrivals = at.get("arrivals") or sim.get("arrivals")
            rows.append([name, h.get("hit_rate"), h.get("correct_hit_rate"), h.get("false_hit_rate"),
                         (exact / arrivals) if exact is not None and arrivals else None, h.get("threshold"),
                         entry.get("oracle_hit_rate", sim.get("oracle_hit_rate"))])
        parts.append(f"## Offline cache simulation (test stream, {sim.get('arrivals', '?')} arrivals, "
                     "threshold chosen in hindsight)\n\n"
                     f"Best hit rate at false-hit rate ≤ {delta:g} over the sweep, chosen on this same stream "
                     "(see the headline for a threshold chosen elsewhere).\n\n" + _table(
                         ["model", "hit rate", "correct-hit rate", "false-hit rate", "exact-repeat hit rate",
                          "threshold", "oracle hit rate"], rows))
        for png in sorted(lay.sim.glob("*.png")):
            plots.append(png)
    live = stages.get("live", {}).get("result", {})
    if live:
        m, lat = live.get("metrics", {}) or {}, live.get("lookup_latency", {}) or {}
        arrivals = m.get("arrivals") or live.get("arrivals")
        exact, correct = m.get("exact_hits"), m.get("correct_hits")
        semantic = (correct - exact) / arrivals if None not in (exact, correct) and arrivals else None
        parts.append("## Live replay against the Ray Serve service (head of the test stream)\n\n" + _table(
            ["what", "value"], [
                ["model served (chosen by val AUC) / threshold",
                 f"{live.get('model')} / {_fmt(live.get('threshold'))} ({live.get('threshold_rule') or ''} on "
                 f"{live.get('threshold_from') or 'the val stream'})"],
                ["service start-up (s)", live.get("startup_s")],
                ["arrivals (client actors)", f"{live.get('arrivals')} ({live.get('concurrency')})"],
                ["correct-hit rate / false-hit rate",
                 f"{_fmt(m.get('correct_hit_rate'))} / {_fmt(m.get('false_hit_rate'))}"],
                ["semantic correct-hit rate / exact-repeat hit rate",
                 f"{_fmt(semantic)} / {_fmt(exact / arrivals if exact is not None and arrivals else None)}"],
                ["LLM calls saved", m.get("llm_calls_saved")],
                ["throughput (arrivals/s)", live.get("throughput_arrivals_per_s")],
                ["batched lookup latency p50 / p95 / p99 (ms)",
                 f"{_fmt(lat.get('p50_ms'), 1)} / {_fmt(lat.get('p95_ms'), 1)} / {_fmt(lat.get('p99_ms'), 1)}"],
            ]))
    parts.append("## Plots\n\n" + "\n".join(f"![{p.stem}]({p.relative_to(lay.out)})" for p in plots if p.exists()))
    return "\n\n".join(parts) + "\n", [p for p in plots if p.exists()]


def _markdown_to_html(md: str, out: Path) -> str:
    """Minimal renderer for the report's own markdown (headings, tables, paragraphs, images inline)."""
    body, table = [], []

    def flush():
        if table:
            rows = [r.strip().strip("|").split("|") for r in table if not set(r) <= set("|-: ")]
            body.append("<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c.strip())}</{'th' if i == 0 else 'td'}>"
                                 for c in row) + "</tr>" for i, row in enumerate(rows)) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("![") and "](" in line:
            rel = line[line.index("](") + 2:-1]
            data = base64.b64encode((out / rel).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(rel)}" src="data:image/png;base64,{data}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:48%;margin:4px}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>raycache report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>"


def write_report(lay, stages: dict, cfg, total_s: float) -> Path:
    """Write report.md, report.html, metrics.json and simulation.json at the top of the report folder."""
    md, _ = build_markdown(lay, stages, cfg, total_s)
    write_text_atomic(lay.out / "report.md", md)
    write_text_atomic(lay.out / "report.html", _markdown_to_html(md, lay.out))
    for src, name in ((lay.eval / "metrics.json", "metrics.json"), (lay.sim / "simulation.json", "simulation.json"),
                      (lay.sim / "operating.json", "operating.json")):
        if src.exists():
            shutil.copyfile(src, lay.out / name)
    return lay.out / "report.md"
