"""The pipeline's stage bookkeeping and report, on stage outputs written by hand (no training)."""

import json

import pytest

from raycache import pipeline
from raycache.config import PipelineConfig
from raycache.report import write_report


def _fake_run(lay):
    (lay.eval).mkdir(parents=True)
    (lay.eval / "metrics.json").write_text(json.dumps({
        "base": {"model": "default", "auc": 0.69, "average_precision": 0.62, "best_f1": 0.7, "best_f1_threshold": 0.5},
        "bce": {"model": str(lay.model("bce")), "auc": 0.93, "average_precision": 0.9, "best_f1": 0.88,
                "best_f1_threshold": 0.7}}))
    lay.sim.mkdir(parents=True)
    (lay.sim / "simulation.json").write_text(json.dumps({"arrivals": 1500, "models": {
        "base": {"headline": {"hit_rate": 0.70, "false_hit_rate": 0.019, "correct_hit_rate": 0.68, "threshold": 0.86}},
        "bce": {"headline": {"hit_rate": 0.78, "false_hit_rate": 0.018, "correct_hit_rate": 0.76, "threshold": 0.9}}}}))
    (lay.out / "bce").mkdir()
    (lay.out / "bce" / "train_metrics.json").write_text(json.dumps({
        "n_train_pairs": 1200, "base": {"auc": 0.73}, "best_val_auc": 0.92, "wall_s": 279.0,
        "epochs": [{"pairs_per_s": 5.9}]}))
    return {"generate": {"seconds": 1.0, "result": {"prompts": 7230, "train_prompts": 5784, "groups": 1205}},
            "live": {"seconds": 60.0, "result": {"model": "bce", "threshold": 0.9, "startup_s": 15.5, "arrivals": 300,
                                                 "concurrency": 2, "metrics": {"hit_rate": 0.61, "false_hit_rate": 0.0},
                                                 "throughput_arrivals_per_s": 8.7,
                                                 "lookup_latency": {"p50_ms": 350.0, "p95_ms": 673.0, "p99_ms": 720.0}}}}


def test_report_reads_every_figure_from_the_stage_files(tmp_path):
    lay = pipeline.Layout(tmp_path)
    stages = _fake_run(lay)
    report = write_report(lay, stages, PipelineConfig(quick=True, losses=["bce"]), total_s=600)
    text = report.read_text()
    for figure in ("0.690", "0.930", "0.780", "0.920", "1200", "0.730", "673", "8.700"):
        assert figure in text, figure
    html = (tmp_path / "report.html").read_text()
    assert "<table>" in html and "0.930" in html
    assert json.loads((tmp_path / "metrics.json").read_text())["bce"]["auc"] == 0.93
    assert (tmp_path / "simulation.json").exists()


def test_best_model_and_headline(tmp_path):
    lay = pipeline.Layout(tmp_path)
    _fake_run(lay)
    assert pipeline._best_model(lay) == ("bce", str(lay.model("bce")))
    sim = json.loads((lay.sim / "simulation.json").read_text())
    assert pipeline._headline(sim, "bce")["threshold"] == 0.9


def test_unknown_from_stage_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        pipeline.run(PipelineConfig(out=str(tmp_path), from_stage="trian"))


def test_quick_run_is_smaller():
    full, quick = pipeline.sizes(PipelineConfig()), pipeline.sizes(PipelineConfig(quick=True))
    assert quick["max_train_pairs"] < full["max_train_pairs"] and quick["n_arrivals"] < full["n_arrivals"]
