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
    operating = {"base": {"threshold": 0.91, "rule": "fixed_sequence", "test": {
        "correct_hit_rate": 0.512, "false_hit_rate": 0.011, "semantic_correct_hit_rate": 0.101,
        "exact_hit_rate": 0.411}, "best_on_test": {"correct_hit_rate": 0.555}},
        "bce": {"threshold": 0.86, "rule": "fixed_sequence", "test": {
            "correct_hit_rate": 0.634, "false_hit_rate": 0.017, "semantic_correct_hit_rate": 0.223,
            "exact_hit_rate": 0.411}, "best_on_test": {"correct_hit_rate": 0.651}}}
    return {"generate": {"seconds": 1.0, "result": {"prompts": 4615, "train_prompts": 2538, "val_prompts": 354,
                                                    "test_prompts": 723, "groups": 1205}},
            "simulate": {"seconds": 20.0, "result": {"operating": operating}},
            "live": {"seconds": 60.0, "result": {"model": "bce", "threshold": 0.9, "startup_s": 15.5, "arrivals": 300,
                                                 "concurrency": 2, "metrics": {"hit_rate": 0.61, "false_hit_rate": 0.0},
                                                 "throughput_arrivals_per_s": 8.7,
                                                 "lookup_latency": {"p50_ms": 350.0, "p95_ms": 673.0, "p99_ms": 720.0}}}}


def test_report_reads_every_figure_from_the_stage_files(tmp_path):
    lay = pipeline.Layout(tmp_path)
    stages = _fake_run(lay)
    report = write_report(lay, stages, PipelineConfig(quick=True, losses=["bce"]), total_s=600)
    text = report.read_text()
    for figure in ("0.690", "0.930", "0.780", "0.920", "1200", "0.730", "673", "8.700",
                   "63.4%", "22.3%", "41.1%", "65.1%", "0.860"):
        assert figure in text, figure
    # the headline (threshold chosen on the val stream, semantic apart from exact) comes first
    assert text.index("## Headline") < text.index("## Stages") < text.index("## Offline")
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
    with pytest.raises(ValueError, match="comes before"):
        pipeline.run(PipelineConfig(out=str(tmp_path), from_stage="train", to_stage="mine"))


def test_quick_run_is_smaller():
    full, quick = pipeline.sizes(PipelineConfig()), pipeline.sizes(PipelineConfig(quick=True))
    assert quick["max_train_pairs"] < full["max_train_pairs"] and quick["n_arrivals"] < full["n_arrivals"]


def test_sizes_respect_the_config_explicit_values_win_over_quick():
    from raycache.config import GenerateConfig

    full = pipeline.sizes(PipelineConfig())
    defaults = GenerateConfig()
    assert full["n_arrivals"] == defaults.n_arrivals and full["n_test_pairs"] == defaults.n_test_pairs
    cfg = PipelineConfig(generate={"n_arrivals": 777, "n_val_pairs": 55}, max_train_pairs=123, live_arrivals=9)
    assert {k: pipeline.sizes(cfg)[k] for k in ("n_arrivals", "n_val_pairs", "max_train_pairs", "live_arrivals")} \
        == {"n_arrivals": 777, "n_val_pairs": 55, "max_train_pairs": 123, "live_arrivals": 9}
    quick = pipeline.sizes(cfg.model_copy(update={"quick": True}))
    assert quick["n_arrivals"] == 777 and quick["max_train_pairs"] == 123 and quick["live_arrivals"] == 9
    assert quick["n_test_pairs"] == pipeline.QUICK["n_test_pairs"]  # not set: the quick default


def test_cli_flags_and_yaml_reach_sizes_and_teacher(tmp_path):
    import yaml

    from raycache.cli import config_from_args

    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(yaml.safe_dump({"pipeline": {"generate": {"n_arrivals": 321}}}))
    cfg = config_from_args("pipeline", ["--config", str(cfg_file), "--quick", "--teacher", "openai",
                                        "--teacher-model", "M", "--endpoint", "http://x/v1", "--to", "label",
                                        "--api-key-env", "MY_KEY", "-v"])
    assert pipeline.sizes(cfg)["n_arrivals"] == 321 and cfg.to_stage == "label" and cfg.verbose
    label = pipeline.label_config(cfg, pipeline.Layout(tmp_path))
    assert (label.teacher, label.teacher_model, label.endpoint, label.api_key_env) == \
        ("openai", "M", "http://x/v1", "MY_KEY")


def test_served_model_is_chosen_by_validation_not_test(tmp_path):
    lay = pipeline.Layout(tmp_path)
    _fake_run(lay)  # bce has the best TEST auc
    cfg = PipelineConfig(losses=["bce", "sld"])
    lay.model("bce").mkdir(parents=True)
    lay.model("sld").mkdir(parents=True)
    (lay.train_dir("sld") / "train_metrics.json").write_text(json.dumps({"base": {"auc": 0.73}, "best_val_auc": 0.95}))
    assert pipeline._served_model(cfg, lay) == ("sld", str(lay.model("sld")))
    for loss in ("bce", "sld"):  # the base model validates best: it is served
        (lay.train_dir(loss) / "train_metrics.json").write_text(json.dumps({"base": {"auc": 0.99}, "best_val_auc": 0.95}))
    assert pipeline._served_model(cfg, lay) == ("base", None)
