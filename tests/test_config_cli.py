import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raycache import cli
from raycache import config as C

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_default_config_is_current_and_valid():
    shipped = (ROOT / "raycache" / "default_config.yaml").read_text()
    assert shipped == C.default_config_yaml(), "regenerate raycache/default_config.yaml"
    data = yaml.safe_load(shipped)
    assert C.EncoderConfig.model_validate(data["encoder"]) == C.EncoderConfig()
    assert C.CacheConfig.model_validate(data["cache"]) == C.CacheConfig()
    assert C.PipelineConfig.model_validate(data["pipeline"]) == C.PipelineConfig()


def test_flags_override_yaml_and_shared_sections(tmp_path):
    cfg_file = tmp_path / "rc.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "encoder": {"max_length": 32},
        "train": {"loss": "sld", "epochs": 5, "pairs": "from-yaml.jsonl", "out": "o"},
    }))
    cfg = cli.config_from_args("train", ["--config", str(cfg_file), "--epochs", "2", "--pairs", "p.jsonl"])
    assert (cfg.loss, cfg.epochs, cfg.pairs, cfg.encoder.max_length) == ("sld", 2, "p.jsonl", 32)


def test_nested_and_list_flags():
    cfg = cli.config_from_args("simulate", ["--stream", "s", "--out", "o", "--model", "a", "--model", "b",
                                            "--capacity", "none", "--threshold", "0.8", "--encoder.model", "x"])
    assert cfg.models == ["a", "b"] and cfg.cache.capacity is None and cfg.threshold == 0.8
    assert cfg.encoder.model == "x" and cfg.cache.threshold == C.CacheConfig().threshold
    cfg = cli.config_from_args("pipeline", ["--from", "train", "--quick"])
    assert cfg.from_stage == "train" and cfg.quick


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(C.ConfigError, match="epochs"):
        cli.config_from_args("train", ["--pairs", "p", "--out", "o", "--epochs", "0"])
    with pytest.raises(C.ConfigError, match="pairs"):
        cli.config_from_args("train", ["--out", "o"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(C.ConfigError, match="invalid YAML"):
        cli.config_from_args("train", ["--config", str(bad)])
    with pytest.raises(C.ConfigError, match="not found"):
        cli.config_from_args("train", ["--config", str(tmp_path / "missing.yaml")])


def test_console_script_error_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raycache.cli", "evaluate", "--pairs", str(tmp_path / "none.jsonl"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "none.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_every_stage():
    proc = subprocess.run([sys.executable, "-m", "raycache.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for stage in cli.STAGES:
        assert stage in proc.stdout
