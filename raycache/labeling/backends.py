"""Teacher backends: each turns candidate pairs into soft labels P(yes) in [0, 1].

Every teacher adds three columns to the pairs it is given: ``label`` (float, NaN when the row has
no label), ``teacher`` (backend and model, e.g. ``hf:/models/qwen``) and ``error`` (None, or why the
row has no label). A row the teacher can't judge (too long, unparseable answer, endpoint error after
retries) gets an error; it never fails the batch.

* ``reference``: gold answers / groups carried by the pairs (no model; the embedded default);
* ``hf``: a local transformers causal LM, P(yes) from next-token logits after the chat template;
* ``openai``: any OpenAI-compatible chat endpoint, P(yes) from the answer token's top log-probs;
* ``vllm``: vLLM through Ray Data's LLM processors (``raycache.labeling.vllm_backend``).

``BatchTeacher`` subclasses label a pandas batch (``label_batch``) and run in a Ray Data actor pool
(``label_dataset``); the vLLM teacher hands the whole dataset to ``ray.data.llm`` instead.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import threading
import time
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from raycache.answers import answer_set, normalize_answer  # noqa: F401  (normalize_answer re-exported)
from raycache.chat_api import chat_completions_url
from raycache.config import ConfigError, LabelConfig
from raycache.labeling.base import (  # noqa: F401  (re-exported: the public names of the backends)
    LABEL_COLUMNS,
    Judgement,
    Teacher,
    TeacherError,
    with_label_columns,
)
from raycache.labeling.prompt import (
    ANSWER_VARIANTS,
    ANSWERS,
    CONTEXT_TOO_LONG,
    describe_answer,
    judge_answer,
    judge_messages,
    pair_too_long,
    token_word,
)

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import ray.data

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- base classes


class BatchTeacher(Teacher):
    """A teacher that labels pandas batches (``judge``) in Ray Data: in an actor pool when it holds
    state (one loaded model per actor), else in plain tasks."""

    # Whether pairs longer than ``cfg.max_prompt_chars`` are refused before asking the teacher.
    refuses_long_pairs: ClassVar[bool] = True
    # Whether the teacher holds state worth keeping between batches (a model, a connection pool):
    # then it runs in an actor pool, else in plain tasks (no actor start-up).
    stateful: ClassVar[bool] = True

    def __init__(self, cfg: LabelConfig):
        self.cfg = cfg
        self.name = self.display_name(cfg)

    @abstractmethod
    def judge(self, pairs: pd.DataFrame) -> list[Judgement]:
        """One judgement per row of ``pairs`` (columns prompt_a, prompt_b and any extras)."""

    def judge_all(self, pairs: pd.DataFrame) -> tuple[np.ndarray, list[Optional[str]]]:
        """(labels float64 [n] with NaN where unlabelled, errors [n]); long pairs refused first."""
        n = len(pairs)
        labels = np.full(n, np.nan)
        errors: list[Optional[str]] = [None] * n
        if n == 0:
            return labels, errors
        rows = np.arange(n)
        if self.refuses_long_pairs:
            too_long = np.array([
                pair_too_long(str(a), str(b), self.cfg.max_prompt_chars)
                for a, b in zip(pairs["prompt_a"].tolist(), pairs["prompt_b"].tolist())
            ], dtype=bool)
            for i in rows[too_long]:
                errors[i] = CONTEXT_TOO_LONG
            rows = rows[~too_long]
        if len(rows):
            for i, (label, error) in zip(rows, self.judge(pairs.iloc[rows].reset_index(drop=True))):
                if error is None and (label is None or not 0.0 <= label <= 1.0):
                    label, error = None, f"teacher returned no valid probability ({label!r})"
                labels[i] = np.nan if label is None else float(label)
                errors[i] = error
        return labels, errors

    def label_batch(self, batch: pd.DataFrame) -> pd.DataFrame:
        """A copy of ``batch`` with ``label``, ``teacher`` and ``error`` set."""
        labels, errors = self.judge_all(batch)
        out = batch.copy()
        out["label"] = labels
        out["teacher"] = self.name
        out["error"] = pd.Series(errors, index=out.index, dtype=object)
        return out

    def label_table(self, table: "pa.Table") -> "pa.Table":
        """Arrow version of ``label_batch``: input columns keep their types; label columns are typed
        (float64, string, string) so every block written has one schema."""
        wanted = [c for c in table.column_names if c not in LABEL_COLUMNS]
        labels, errors = self.judge_all(table.select(wanted).to_pandas())
        return with_label_columns(table.select(wanted), labels, [self.name] * len(labels), errors)

    # ---- running in Ray Data
    @classmethod
    def ray_remote_args(cls, cfg: LabelConfig) -> dict[str, Any]:
        """Resources per actor."""
        return {"num_cpus": 0.5}

    @classmethod
    def pool_size(cls, cfg: LabelConfig) -> int:
        """Actors in the pool."""
        return 1

    @classmethod
    def label_dataset(cls, ds: "ray.data.Dataset", cfg: LabelConfig,
                      columns: Sequence[str]) -> "ray.data.Dataset":
        import ray.data

        if not cls.stateful:
            return ds.map_batches(_label_table, fn_kwargs={"teacher_cls": cls, "cfg": cfg},
                                  batch_size=cfg.batch_size, batch_format="pyarrow",
                                  **cls.ray_remote_args(cfg))
        return ds.map_batches(
            _TeacherActor,
            fn_constructor_kwargs={"teacher_cls": cls, "cfg": cfg},
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cls.pool_size(cfg)),
            **cls.ray_remote_args(cfg),
        )


class _TeacherActor:
    """Ray Data actor: builds one teacher (model loaded once) and labels Arrow batches."""

    def __init__(self, teacher_cls: type[BatchTeacher], cfg: LabelConfig):
        self.teacher = teacher_cls(cfg)

    def __call__(self, table: "pa.Table") -> "pa.Table":
        return self.teacher.label_table(table)


def _label_table(table: "pa.Table", teacher_cls: type[BatchTeacher], cfg: LabelConfig) -> "pa.Table":
    """Ray Data task: label one Arrow batch with a stateless teacher."""
    return teacher_cls(cfg).label_table(table)


# --------------------------------------------------------------------------- reference


def _group(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return str(value) or None


class ReferenceTeacher(BatchTeacher):
    """Gold-label teacher from the columns the mining job carries over from the prompt set.

    A pair whose prompts both have a group is labelled by the groups: 1.0 when they match (a group
    is the set of prompts that share one response). Otherwise 1.0 when the SQuAD-normalised
    answers intersect. Groups win when both are known: "Where is Laos?" and "Where is Uzbekistan?"
    share the answer "Asia" but not a response. A row with neither gets an error.
    """

    kind = "reference"
    refuses_long_pairs = False
    stateful = False

    @classmethod
    def display_name(cls, cfg: LabelConfig) -> str:
        return "reference"

    @classmethod
    def check_columns(cls, columns: Sequence[str]) -> None:
        cols = set(columns)
        if not ({"answers_a", "answers_b"} <= cols or {"group_a", "group_b"} <= cols):
            raise ConfigError(
                "the reference teacher needs gold answers (answers_a, answers_b) or groups "
                f"(group_a, group_b); the pairs have: {', '.join(sorted(cols))}. "
                "Use an LLM teacher (--teacher hf|openai|vllm) for pairs without them."
            )

    def judge(self, pairs: pd.DataFrame) -> list[Judgement]:
        n = len(pairs)
        none = [None] * n
        answers_a = pairs["answers_a"].tolist() if "answers_a" in pairs else none
        answers_b = pairs["answers_b"].tolist() if "answers_b" in pairs else none
        groups_a = pairs["group_a"].tolist() if "group_a" in pairs else none
        groups_b = pairs["group_b"].tolist() if "group_b" in pairs else none
        out: list[Judgement] = []
        for ans_a, ans_b, grp_a, grp_b in zip(answers_a, answers_b, groups_a, groups_b):
            set_a, set_b = answer_set(ans_a), answer_set(ans_b)
            grp_a, grp_b = _group(grp_a), _group(grp_b)
            has_answers, has_groups = bool(set_a and set_b), grp_a is not None and grp_b is not None
            if not (has_answers or has_groups):
                out.append((None, "no gold answers or groups for this pair"))
                continue
            same = grp_a == grp_b if has_groups else bool(set_a & set_b)
            out.append((1.0 if same else 0.0, None))
        return out


# --------------------------------------------------------------------------- hf


def answer_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids whose probability counts for yes and for no at the answer position.

    For each spelling in ``ANSWER_VARIANTS`` (``yes``, `` yes``, ``Yes``, ...) the first token is
    taken when its text starts the answer word (so ``y`` or ``Yes`` count, a bare space or the
    unknown token do not). Ids that would count for both answers are dropped.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    sides: dict[str, set[int]] = {answer: set() for answer in ANSWERS}
    for answer, variants in ANSWER_VARIANTS.items():
        for variant in variants:
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if not ids or ids[0] in special:
                continue
            text = token_word(tokenizer.decode([ids[0]]))
            if text and answer.startswith(text):
                sides[answer].add(int(ids[0]))
    both = sides["yes"] & sides["no"]
    return sorted(sides["yes"] - both), sorted(sides["no"] - both)


def _load_error(source: str, exc: Exception) -> TeacherError:
    if Path(source).exists():
        return TeacherError(f"{source}: not a loadable transformers causal LM folder ({exc})")
    return TeacherError(
        f"teacher model {source!r} could not be loaded: it is not a local folder and the hub is "
        f"not reachable (offline?). Download it where you have internet "
        f"(`huggingface-cli download {source} --local-dir DIR`) and pass --teacher-model DIR. "
        f"Cause: {type(exc).__name__}: {exc}"
    )


class HFTeacher(BatchTeacher):
    """A local transformers causal LM: P(yes) from the next-token logits after the chat template.

    P(yes) = sigmoid(logsumexp(logits[yes ids]) − logsumexp(logits[no ids])) at the first answer
    position; batches are left-padded with explicit position ids, so a pair's label does not depend
    on its batch. A pair whose templated prompt exceeds ``max_model_len`` tokens gets an error.
    """

    kind = "hf"

    @classmethod
    def check_config(cls, cfg: LabelConfig) -> None:
        cls.require_model(cfg)

    @classmethod
    def ray_remote_args(cls, cfg: LabelConfig) -> dict[str, Any]:
        import ray

        wants_gpu = cfg.device.startswith("cuda") or (
            cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
        return {"num_cpus": 1, "num_gpus": 1 if wants_gpu else 0}

    @classmethod
    def pool_size(cls, cfg: LabelConfig) -> int:
        return cfg.concurrency

    def __init__(self, cfg: LabelConfig):
        super().__init__(cfg)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from raycache.encoder import resolve_device

        source = str(cfg.teacher_model)
        self.device = resolve_device(cfg.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise _load_error(source, exc) from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise TeacherError(
                f"{source}: the tokenizer has no chat template; use an instruction-tuned (chat) model")
        self.yes_ids, self.no_ids = answer_token_ids(self.tokenizer)
        if not self.yes_ids or not self.no_ids:
            raise TeacherError(f"{source}: the vocabulary has no token for 'yes' or for 'no'")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "left"
        self.model.to(self.device).eval()

    def prompt_text(self, prompt_a: str, prompt_b: str) -> str:
        """The judging messages rendered by the model's chat template, ready for the answer."""
        return self.tokenizer.apply_chat_template(
            judge_messages(prompt_a, prompt_b), add_generation_prompt=True, tokenize=False)

    def judge(self, pairs: pd.DataFrame) -> list[Judgement]:
        texts = [self.prompt_text(str(a), str(b))
                 for a, b in zip(pairs["prompt_a"].tolist(), pairs["prompt_b"].tolist())]
        token_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out: list[Judgement] = [(None, CONTEXT_TOO_LONG)] * len(texts)
        fits = [i for i, ids in enumerate(token_ids) if len(ids) <= self.cfg.max_model_len]
        fits.sort(key=lambda i: len(token_ids[i]))  # similar lengths share a batch: little padding
        for start in range(0, len(fits), self.cfg.batch_size):
            chunk = fits[start:start + self.cfg.batch_size]
            for i, p in zip(chunk, self.p_yes([token_ids[i] for i in chunk])):
                out[i] = (p, None)
        return out

    def p_yes(self, token_ids: list[list[int]]) -> list[float]:
        """P(yes) for each tokenised prompt (one forward pass, left-padded)."""
        import torch

        batch = self.tokenizer.pad({"input_ids": token_ids}, padding=True, return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask,
                                position_ids=positions).logits[:, -1, :].float()
        lse_yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        lse_no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return torch.sigmoid(lse_yes - lse_no).cpu().tolist()


# --------------------------------------------------------------------------- openai


RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_DELAY_S = 120.0


def retry_delay(attempt: int, backoff_s: float, retry_after: Optional[str] = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): the server's Retry-After (seconds or an
    HTTP date) when given, else ``backoff_s · 2^attempt``; capped at MAX_RETRY_DELAY_S."""
    if retry_after:
        value = retry_after.strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                seconds = when.timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = None
        if seconds is not None and math.isfinite(seconds):
            return min(max(seconds, 0.0), MAX_RETRY_DELAY_S)
    return min(backoff_s * (2 ** attempt), MAX_RETRY_DELAY_S)


def _top_logprobs_of_first_token(choice: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(token, logprob) alternatives at the first generated position: the top log-probs, plus the
    chosen token when it is not among them (each token counted once)."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], Mapping):
        return []
    first = content[0]
    top = first.get("top_logprobs")
    entries = [e for e in (top if isinstance(top, list) else []) if isinstance(e, Mapping)] + [first]
    alternatives: dict[str, float] = {}
    for entry in entries:
        token, logprob = entry.get("token"), entry.get("logprob")
        if isinstance(token, str) and isinstance(logprob, (int, float)) and token not in alternatives:
            alternatives[token] = float(logprob)
    return list(alternatives.items())


def judgement_from_chat_response(body: Any) -> Judgement:
    """A chat-completions response body -> judgement: log-probs first, strict text parse second."""
    choices = body.get("choices") if isinstance(body, Mapping) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return None, "malformed response: no choices"
    choice = choices[0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, Mapping) else None
    return judge_answer(_top_logprobs_of_first_token(choice), text)


class OpenAITeacher(BatchTeacher):
    """Any OpenAI-compatible chat endpoint (``vllm serve``, Ray Serve LLM, a hosted API).

    One request per pair (``max_tokens=1``, ``temperature=0``, ``logprobs`` with ``top_logprobs``),
    at most ``cfg.concurrency`` in flight; 429/5xx and network errors are retried with exponential
    backoff (Retry-After respected) up to ``cfg.max_retries`` times, each try limited to
    ``cfg.timeout_s``. The API key is read from ``$cfg.api_key_env`` and sent only as a header.
    """

    kind = "openai"

    @classmethod
    def check_config(cls, cfg: LabelConfig) -> None:
        if not cfg.endpoint:
            raise ConfigError("--teacher openai needs --endpoint (e.g. http://host:8000/v1)")
        cls.require_model(cfg, "the served model name")
        if not cfg.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"--endpoint must be an http(s) URL, got {cfg.endpoint!r}")

    def __init__(self, cfg: LabelConfig):
        super().__init__(cfg)
        import httpx

        self.url = chat_completions_url(str(cfg.endpoint))
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(cfg.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        else:
            logger.info("$%s is not set; calling %s without an API key", cfg.api_key_env, self.url)
        self.client = httpx.Client(
            headers=headers, timeout=cfg.timeout_s,
            limits=httpx.Limits(max_connections=cfg.concurrency,
                                max_keepalive_connections=cfg.concurrency))
        self._slots = threading.BoundedSemaphore(cfg.concurrency)

    def request_body(self, prompt_a: str, prompt_b: str) -> dict[str, Any]:
        return {
            "model": self.cfg.teacher_model,
            "messages": judge_messages(prompt_a, prompt_b),
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.cfg.top_logprobs,
        }

    def judge(self, pairs: pd.DataFrame) -> list[Judgement]:
        pairs_ab = list(zip(pairs["prompt_a"].tolist(), pairs["prompt_b"].tolist()))
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(pairs_ab))) as pool:
            return list(pool.map(lambda ab: self.judge_pair(str(ab[0]), str(ab[1])), pairs_ab))

    def judge_pair(self, prompt_a: str, prompt_b: str) -> Judgement:
        """One request (with retries) -> judgement; never raises for endpoint or answer problems."""
        import httpx

        body = self.request_body(prompt_a, prompt_b)
        problem = "no attempt made"
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            try:
                with self._slots:
                    response = self.client.post(self.url, json=body)
            except httpx.TimeoutException:
                problem = f"timed out after {self.cfg.timeout_s:g} s"
            except httpx.TransportError as exc:
                problem = f"connection error: {type(exc).__name__}: {exc}"
            except httpx.HTTPError as exc:  # e.g. an undecodable body: not worth retrying
                return None, f"request failed: {type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    try:
                        payload = response.json()
                    except ValueError:
                        return None, f"malformed response: not JSON: {describe_answer(response.text)}"
                    return judgement_from_chat_response(payload)
                problem = f"HTTP {response.status_code}: {describe_answer(response.text, 200)}"
                if response.status_code not in RETRY_STATUS:
                    return None, problem
                retry_after = response.headers.get("retry-after")
            if attempt < self.cfg.max_retries:
                time.sleep(retry_delay(attempt, self.cfg.backoff_s, retry_after))
        return None, f"{problem} (after {self.cfg.max_retries} retries)"

    def __del__(self):
        client = getattr(self, "client", None)
        if client is not None:
            client.close()


# --------------------------------------------------------------------------- registry


def teacher_class(kind: str) -> type[Teacher]:
    """The backend class for ``--teacher kind``."""
    if kind == "vllm":
        from raycache.labeling.vllm_backend import VLLMTeacher

        return VLLMTeacher
    try:
        return {"reference": ReferenceTeacher, "hf": HFTeacher, "openai": OpenAITeacher}[kind]
    except KeyError:
        raise ConfigError(f"unknown teacher {kind!r}; expected reference, hf, openai or vllm") from None
