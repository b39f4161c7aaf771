"""The vLLM teacher, tested as Ray's CPU CI tests its LLM processors: the engine is mocked,
everything around it is real (ray.data.llm config, Ray's pre/postprocess wrappers, the engine's
output row layout, prompt building, log-probs -> P(yes), error rows, the GPU check)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest

from raycache.config import ConfigError, LabelConfig
from raycache.labeling import vllm_backend
from raycache.labeling.backends import TeacherError
from raycache.labeling.prompt import CONTEXT_TOO_LONG, judge_messages


def _cfg(**kw) -> LabelConfig:
    kw = {"pairs": "unused", "out": "unused", "teacher": "vllm", "teacher_model": "Qwen/Qwen2.5-7B-Instruct",
          **kw}
    return LabelConfig(**kw)


def _engine_row(top: dict[str, float] | None, text: str) -> dict:
    """A row as Ray's vLLM stage emits it (vLLMOutputData), log-probs keyed by token id."""
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMOutputData

    logprobs = None
    if top is not None:
        logprobs = [{1000 + i: {"logprob": lp, "rank": i + 1, "decoded_token": tok}
                     for i, (tok, lp) in enumerate(top.items())}]
    return vLLMOutputData(prompt="...", prompt_token_ids=[1, 2, 3], num_input_tokens=3,
                          generated_tokens=[1000], generated_text=text, num_generated_tokens=1,
                          logprobs=logprobs).model_dump()


def test_build_request_uses_the_shared_prompt_and_restricts_answers():
    row = {"prompt_a": "Capital of France?", "prompt_b": "France's capital?", "pair_id": "x"}
    req = vllm_backend.build_request(row, max_prompt_chars=100, top_logprobs=5)
    assert req["messages"] == judge_messages("Capital of France?", "France's capital?")
    assert req["sampling_params"] == {"temperature": 0.0, "max_tokens": 1, "logprobs": 5,
                                      "structured_outputs": {"choice": ["yes", "no"]}}
    assert req[vllm_backend.TOO_LONG_COLUMN] is False
    long = vllm_backend.build_request(row, max_prompt_chars=20, top_logprobs=5)
    assert long[vllm_backend.TOO_LONG_COLUMN] is True
    assert "France" not in long["messages"][1]["content"]  # the long pair is never sent


def test_judgement_from_engine_rows():
    row = _engine_row({"yes": math.log(0.6), "Yes": math.log(0.1), "no": math.log(0.1), "The": -3.0}, "yes")
    assert vllm_backend.judgement_from_engine_row(row) == (pytest.approx(0.7 / 0.8), None)
    # after an Arrow round trip the token-id keys may be strings and absent ids None
    row["logprobs"] = [{str(k): v for k, v in row["logprobs"][0].items()} | {"77": None}]
    assert vllm_backend.judgement_from_engine_row(row) == (pytest.approx(0.7 / 0.8), None)
    assert vllm_backend.judgement_from_engine_row(_engine_row(None, "no")) == (0.0, None)
    assert vllm_backend.judgement_from_engine_row(_engine_row(None, "y")) == (
        None, "unparseable answer: 'y'")
    too_long = {**_engine_row(None, "yes"), vllm_backend.TOO_LONG_COLUMN: True}
    assert vllm_backend.judgement_from_engine_row(too_long) == (None, CONTEXT_TOO_LONG)


def test_processor_config_is_a_real_ray_data_llm_config():
    import ray.data.llm

    config = vllm_backend.processor_config(_cfg(tensor_parallel_size=2, max_model_len=4096,
                                                 batch_size=32, concurrency=3))
    assert isinstance(config, ray.data.llm.vLLMEngineProcessorConfig)
    assert config.model_source == "Qwen/Qwen2.5-7B-Instruct"
    assert config.engine_kwargs["tensor_parallel_size"] == 2
    assert config.engine_kwargs["max_model_len"] == 4096
    assert config.batch_size == 32 and config.concurrency == 3
    assert config.should_continue_on_error is True  # a failed row becomes an error row, not a crash


def test_missing_ray_llm_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.data.llm", None)  # import fails as without ray[llm]
    with pytest.raises(TeacherError, match=r"pip install 'raycache\[vllm\]'"):
        vllm_backend.import_ray_data_llm()


def test_vllm_needs_a_model():
    with pytest.raises(ConfigError, match="--teacher-model"):
        vllm_backend.VLLMTeacher.check_config(_cfg(teacher_model=None))


@pytest.mark.ray
def test_vllm_job_without_gpus_fails_at_once(ray_local, tmp_path):
    from raycache.labeling import job

    assert ray_local.cluster_resources().get("GPU", 0) == 0
    # the pair file does not even exist: the GPU check comes before any data is read
    with pytest.raises(TeacherError, match=r"needs 1 GPU\(s\) per engine but the Ray cluster has 0"):
        job.run(_cfg(pairs=str(tmp_path / "missing.jsonl"), out=str(tmp_path / "out")))


def _mocked_build_processor(calls: list, top_logprobs: int):
    """A stand-in for ray.data.llm.build_processor: Ray's real pre/postprocess wrappers around a
    mocked engine stage that answers like vLLM (logprobs by token id, error rows)."""

    def build(config, preprocess, postprocess):
        from ray.llm._internal.batch.stages.base import wrap_postprocess, wrap_preprocess
        from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMOutputData

        calls.append(config)
        data = "__data"

        def engine(row):
            request = dict(row[data])
            params = request["sampling_params"]
            assert params["structured_outputs"] == {"choice": ["yes", "no"]}, params
            assert params["max_tokens"] == 1 and params["logprobs"] == top_logprobs
            user = request["messages"][1]["content"]
            out = vLLMOutputData(prompt=user, num_input_tokens=len(user.split())).model_dump()
            if "ENGINE_FAIL" in user:
                out["__inference_error__"] = ("ValueError: The decoder prompt (length 9000) is longer "
                                              "than the maximum model length of 2048.")
            elif "NO_LOGPROBS" in user:
                out.update(generated_text="yes", generated_tokens=[5], __inference_error__="")
            else:
                p_yes = 0.9 if "SAME" in user else 0.2
                alternatives = {5: ("yes", p_yes * 0.9), 8: ("Yes", p_yes * 0.1), 6: ("no", 1 - p_yes)}
                out.update(generated_text="yes" if p_yes > 0.5 else "no", generated_tokens=[5],
                           __inference_error__="",
                           logprobs=[{tid: {"logprob": math.log(p), "rank": rank, "decoded_token": tok}
                                      for rank, (tid, (tok, p)) in enumerate(alternatives.items(), 1)}])
            request.pop("messages"), request.pop("sampling_params")
            return {data: {**request, **out}}

        def processor(ds):
            ds = ds.map(wrap_preprocess(preprocess, data))
            ds = ds.map(engine)
            return ds.map(wrap_postprocess(postprocess, data, include_error_column=True))

        return processor

    return build


@pytest.mark.ray
def test_vllm_job_with_mocked_engine(ray_local, tmp_path, monkeypatch):
    from raycache.data import read_pairs, write_table
    from raycache.labeling import job

    markers = ["SAME", "DIFF", "ENGINE_FAIL", "NO_LOGPROBS", "SAME", "DIFF"]
    pairs = pd.DataFrame({
        "prompt_a": [f"question {i} {m}" for i, m in enumerate(markers)] + ["x" * 300],
        "prompt_b": [f"other {i}" for i in range(len(markers))] + ["long pair"],
        "answers_a": [["a"]] * 7, "answers_b": [None] * 7,
    })
    write_table(pairs, tmp_path / "pairs.jsonl")
    calls: list = []
    monkeypatch.setattr(vllm_backend, "build_processor", _mocked_build_processor(calls, top_logprobs=4))
    monkeypatch.setattr(vllm_backend, "require_gpus", lambda n: None)  # no GPUs here, engine mocked
    monkeypatch.setattr(vllm_backend, "require_vllm_installed", lambda: None)
    cfg = _cfg(pairs=str(tmp_path / "pairs.jsonl"), out=str(tmp_path / "out"), top_logprobs=4,
               max_prompt_chars=200, max_error_rate=0.5)
    summary = job.run(cfg)
    assert len(calls) == 1 and calls[0].engine_kwargs["max_model_len"] == cfg.max_model_len

    labelled = read_pairs(tmp_path / "out")
    assert list(labelled.columns) == [*pairs.columns, "pair_id", "label", "teacher", "error"]
    out = labelled.set_index("prompt_b")
    assert out.loc[["other 0", "other 4"], "label"].tolist() == pytest.approx([0.9, 0.9])
    assert out.loc["other 1", "label"] == pytest.approx(0.2)
    assert out.loc["other 3", "label"] == 1.0  # no log-probs: the constrained text "yes"
    assert out.loc["other 2", "error"].startswith("engine error: 'ValueError: The decoder prompt")
    assert out.loc["long pair", "error"] == CONTEXT_TOO_LONG
    assert np.isnan(out.loc[["other 2", "long pair"], "label"]).all()
    assert set(out["teacher"]) == {"vllm:Qwen/Qwen2.5-7B-Instruct"}
    assert out.loc["other 0", "answers_a"] == ["a"]  # pair columns pass through the processor
    assert summary["labelled"] == 5 and summary["errors"] == 2
