import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from raycache import evaluation
from raycache.config import EvaluateConfig


def _pairs():
    rows = [
        ("What is the capital of France?", "Which city is the capital of France?", 1),
        ("What is the capital of France?", "What is the capital of Spain?", 0),
        ("How tall is Mount Everest?", "What is the height of Mount Everest?", 1),
        ("How tall is Mount Everest?", "How tall is K2?", 0),
        ("Who wrote Hamlet?", "Hamlet was written by whom?", 1),
        ("Who wrote Hamlet?", "Who wrote Macbeth?", 0),
        ("Best banana bread recipe", "What is the boiling point of water?", 0.2),
        ("Translate hello to French", "How do you say hello in French?", 0.9),
    ]
    return pd.DataFrame(rows, columns=["prompt_a", "prompt_b", "label"])


def test_similarity_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    s = rng.uniform(-1, 1, 200)
    y = (s + rng.normal(0, 0.5, 200) > 0).astype(float)
    m = evaluation.similarity_metrics(s, y, thresholds=[0.0])
    assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    pred = s >= 0.0
    assert m["at_threshold"]["0"]["precision"] == pytest.approx((pred & (y == 1)).sum() / pred.sum())
    assert 0 < m["best_f1"] <= 1


def test_single_class_is_a_clear_error():
    with pytest.raises(ValueError, match="both positive and negative"):
        evaluation.similarity_metrics(np.array([0.1, 0.2]), [1, 1])


def test_evaluate_run_writes_metrics_and_plots(tmp_path, encoder):
    pairs = _pairs()
    path = tmp_path / "pairs.jsonl"
    pairs.to_json(path, orient="records", lines=True)
    out = tmp_path / "eval"
    summary = evaluation.run(EvaluateConfig(pairs=str(path), out=str(out)))
    metrics = json.loads((out / "metrics.json").read_text())
    sims = evaluation.pair_similarities(encoder, pairs.prompt_a, pairs.prompt_b)
    expected = roc_auc_score((pairs.label >= 0.5).astype(int), sims)
    assert metrics["base"]["auc"] == pytest.approx(expected, abs=1e-6)
    assert summary["base"]["auc"] == pytest.approx(expected, abs=1e-6)
    assert (out / "roc.png").stat().st_size > 1000 and (out / "pr.png").stat().st_size > 1000


def test_model_label():
    assert evaluation.model_label(None) == "base"
    assert evaluation.model_label("runs/bce/model") == "bce"
    assert evaluation.model_label("/x/finetuned") == "finetuned"
