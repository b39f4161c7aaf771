"""The vLLM teacher: vLLM engines on GPUs through Ray Data's LLM batch processors (``ray.data.llm``).

Each pair becomes a chat request (the shared judging prompt) with sampling params
``temperature=0, max_tokens=1, logprobs=top_logprobs`` and vLLM structured outputs restricted to
``yes``/``no`` (``structured_outputs={"choice": [...]}``, which Ray's vLLM stage turns into
``vllm.sampling_params.StructuredOutputsParams``). vLLM reports log-probs of the raw model
distribution (``logprobs_mode="raw_logprobs"``, before the choice mask), so P(yes) comes from the
yes/no spellings among the first token's alternatives; the constrained text is the fallback.

The engine stage returns per row ``generated_text`` and ``logprobs``: one dict per generated token,
``{token_id: {"logprob", "rank", "decoded_token"}}``. With ``should_continue_on_error`` a failed row
(e.g. a prompt over ``max_model_len``) skips the postprocess and carries ``__inference_error__``
instead; ``finalize_batch`` turns both kinds of row into the labelled-pair schema.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from raycache.config import LabelConfig
from raycache.labeling.base import LABEL_COLUMNS, Judgement, Teacher, TeacherError, with_label_columns
from raycache.labeling.prompt import (ANSWERS, CONTEXT_TOO_LONG, describe_answer, judge_answer, judge_messages,
                                      pair_too_long)

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import ray.data

INSTALL_HINT = "pip install 'raycache[vllm]' (vLLM and Ray's LLM extras) on the GPU cluster"
# Column marking pairs refused before the engine (too long); the engine still sees a stub request.
TOO_LONG_COLUMN = "__raycache_too_long"
INFERENCE_ERROR_COLUMN = "__inference_error__"


def import_ray_data_llm() -> Any:
    """``ray.data.llm``, or a TeacherError saying what to install."""
    try:
        import ray.data.llm as ray_data_llm
    except ImportError as exc:
        raise TeacherError(f"the vllm teacher needs ray.data.llm ({exc}); {INSTALL_HINT}") from None
    return ray_data_llm


def require_vllm_installed() -> None:
    """Fail on the driver, at once, when vLLM is missing (instead of in every engine actor)."""
    if importlib.util.find_spec("vllm") is None:
        raise TeacherError(f"the vllm teacher needs the vllm package, which is not installed; {INSTALL_HINT}")


def require_gpus(tensor_parallel_size: int) -> None:
    """Fail at once when the Ray cluster has fewer GPUs than one engine needs."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus < tensor_parallel_size:
        raise TeacherError(
            f"the vllm teacher needs {tensor_parallel_size} GPU(s) per engine but the Ray cluster "
            f"has {gpus:g}. Submit the job to a cluster with GPU nodes (start them first if it "
            "autoscales), or label without GPUs: --teacher hf (a small local model) or "
            "--teacher openai (an OpenAI-compatible endpoint)."
        )


def sampling_params(top_logprobs: int) -> dict[str, Any]:
    """Per-request vLLM sampling params: one greedy token restricted to yes/no, with log-probs."""
    return {
        "temperature": 0.0,
        "max_tokens": 1,
        "logprobs": top_logprobs,
        "structured_outputs": {"choice": list(ANSWERS)},
    }


def build_request(row: dict[str, Any], max_prompt_chars: int, top_logprobs: int) -> dict[str, Any]:
    """Processor preprocess: a pair row -> ``messages`` + ``sampling_params`` (+ the too-long flag).

    A pair over ``max_prompt_chars`` is not sent; a stub request keeps the row in the batch and
    ``judgement_from_engine_row`` reports it as too long.
    """
    prompt_a, prompt_b = str(row["prompt_a"]), str(row["prompt_b"])
    too_long = pair_too_long(prompt_a, prompt_b, max_prompt_chars)
    return {
        "messages": judge_messages("", "") if too_long else judge_messages(prompt_a, prompt_b),
        "sampling_params": sampling_params(top_logprobs),
        TOO_LONG_COLUMN: too_long,
    }


def first_token_alternatives(logprobs: Any) -> list[tuple[str, float]]:
    """(decoded token, logprob) alternatives of the first generated token from the engine's
    ``logprobs`` column (a list of ``{token_id: {"logprob", "decoded_token", ...}}``)."""
    if logprobs is None or isinstance(logprobs, (str, bytes)) or len(logprobs) == 0:
        return []
    first = logprobs[0]
    if not isinstance(first, Mapping):
        return []
    out = []
    for info in first.values():
        if not isinstance(info, Mapping):
            continue  # absent ids of a unified struct are None
        token, logprob = info.get("decoded_token"), info.get("logprob")
        if isinstance(token, str) and isinstance(logprob, (int, float, np.floating)):
            out.append((token, float(logprob)))
    return out


def judgement_from_engine_row(row: Mapping[str, Any]) -> Judgement:
    """A processed row -> judgement: the first token's log-probs, else the constrained text."""
    if row.get(TOO_LONG_COLUMN):
        return None, CONTEXT_TOO_LONG
    return judge_answer(first_token_alternatives(row.get("logprobs")), row.get("generated_text"))


def postprocess_row(row: dict[str, Any], columns: list[str], teacher: str) -> dict[str, Any]:
    """Processor postprocess: the pair's own columns plus label / teacher / error."""
    label, error = judgement_from_engine_row(row)
    out = {c: row.get(c) for c in columns}
    out.update(label=np.nan if label is None else label, teacher=teacher, error=error)
    return out


def finalize_batch(table: "pa.Table", columns: list[str], teacher: str) -> "pa.Table":
    """Processor output -> pairs schema. Rows the engine failed on bypassed the postprocess: they
    get ``error`` from ``__inference_error__`` and no label."""
    import pyarrow as pa

    n = table.num_rows
    present = table.column_names

    def column(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in present else [None] * n

    labels, errors = column("label"), column("error")
    for i, engine_error in enumerate(column(INFERENCE_ERROR_COLUMN)):
        if engine_error:
            labels[i], errors[i] = None, f"engine error: {describe_answer(engine_error, 300)}"
        elif labels[i] is None and errors[i] is None:
            errors[i] = "no teacher output for this row"
    labels = [np.nan if v is None else v for v in labels]
    base = pa.table({c: table.column(c) for c in columns if c in present})
    for c in columns:
        if c not in present:
            base = base.append_column(c, pa.nulls(n))
    return with_label_columns(base.select(columns), labels, [teacher] * n, errors)


def processor_config(cfg: LabelConfig) -> Any:
    """The ``ray.data.llm.vLLMEngineProcessorConfig`` for this job."""
    llm = import_ray_data_llm()
    return llm.vLLMEngineProcessorConfig(
        model_source=str(cfg.teacher_model),
        engine_kwargs={
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "max_model_len": cfg.max_model_len,
            "enable_prefix_caching": True,  # every request shares the system prompt
        },
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        should_continue_on_error=True,
    )


def build_processor(config: Any, preprocess: Any, postprocess: Any) -> Any:
    """``ray.data.llm.build_processor`` (a seam for tests, which swap in a mocked engine)."""
    return import_ray_data_llm().build_processor(config, preprocess=preprocess, postprocess=postprocess)


class VLLMTeacher(Teacher):
    """vLLM engines (tensor parallel, ``concurrency`` replicas) fed by a Ray Data processor."""

    kind = "vllm"

    @classmethod
    def check_config(cls, cfg: LabelConfig) -> None:
        cls.require_model(cfg)

    @classmethod
    def check_cluster(cls, cfg: LabelConfig) -> None:
        require_gpus(cfg.tensor_parallel_size)
        import_ray_data_llm()
        require_vllm_installed()

    @classmethod
    def label_dataset(cls, ds: "ray.data.Dataset", cfg: LabelConfig,
                      columns: Sequence[str]) -> "ray.data.Dataset":
        columns = [c for c in columns if c not in LABEL_COLUMNS]
        teacher = cls.display_name(cfg)
        processor = build_processor(
            processor_config(cfg),
            preprocess=functools.partial(build_request, max_prompt_chars=cfg.max_prompt_chars,
                                         top_logprobs=cfg.top_logprobs),
            postprocess=functools.partial(postprocess_row, columns=columns, teacher=teacher),
        )
        return processor(ds).map_batches(
            finalize_batch, fn_kwargs={"columns": columns, "teacher": teacher},
            batch_format="pyarrow")
