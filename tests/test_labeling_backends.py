"""Teacher backends run for real: reference on gold columns, hf on a tiny random causal LM built
here, openai against an in-test chat-completions server (logprobs, 429/500, malformed bodies)."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

from raycache.config import ConfigError, LabelConfig
from raycache.labeling.backends import (
    HFTeacher,
    OpenAITeacher,
    ReferenceTeacher,
    TeacherError,
    answer_token_ids,
    chat_completions_url,
    judgement_from_chat_response,
    normalize_answer,
    retry_delay,
)
from raycache.labeling.prompt import CONTEXT_TOO_LONG, SYSTEM_MESSAGE, USER_TEMPLATE, judge_messages


def _cfg(**kw) -> LabelConfig:
    return LabelConfig(pairs="unused", out="unused", **kw)


# --------------------------------------------------------------------------- reference


def test_normalize_answer_is_squad_style():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an Apple a day") == "apple day"


def test_reference_teacher_labels_from_groups_else_answers():
    batch = pd.DataFrame({
        "prompt_a": ["capital of France?", "capital of France?", "capital of Spain?",
                     "Where is Laos?", "q?", "x?"],
        "prompt_b": ["France's capital?", "currency of France?", "Spain: capital?",
                     "Where is Uzbekistan?", "r?", "y?"],
        "answers_a": [["Paris"], ["Paris"], None, ["Asia"], ["The Euro"], None],
        "answers_b": [["paris."], ["euro"], None, ["Asia"], ["euro", "EUR"], None],
        "group_a": [None, "fr:capital", "es:capital", "laos:continent", None, None],
        "group_b": [None, "fr:currency", "es:capital", "uzbekistan:continent", "euro", None],
    })
    out = ReferenceTeacher(_cfg()).label_batch(batch)
    # answers decide without groups on both sides; groups decide when known (Asia != one response)
    assert out["label"].tolist()[:5] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert math.isnan(out["label"].iloc[5]) and "no gold answers or groups" in out["error"].iloc[5]
    assert out["error"].iloc[:5].isna().all()
    assert set(out["teacher"]) == {"reference"}
    assert list(out.columns[:6]) == list(batch.columns)  # input columns kept, in order


def test_reference_teacher_needs_gold_columns():
    ReferenceTeacher.check_columns(["prompt_a", "prompt_b", "group_a", "group_b"])
    with pytest.raises(ConfigError, match="answers_a, answers_b"):
        ReferenceTeacher.check_columns(["prompt_a", "prompt_b", "answers_a"])


# --------------------------------------------------------------------------- hf


def build_tiny_chat_lm(folder, extra_texts=(), with_chat_template=True):
    """A randomly initialised 2-layer Llama with a word-level tokenizer over the judging prompt's
    words, saved as a transformers folder; returns the folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    texts = [SYSTEM_MESSAGE, USER_TEMPLATE, "system user assistant : yes no Yes No", *extra_texts]
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {tok: i for i, tok in enumerate(["[UNK]", "[PAD]", "</s>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                        pad_token="[PAD]", eos_token="</s>")
    if with_chat_template:
        tokenizer.chat_template = (
            "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.5,
                         pad_token_id=vocab["[PAD]"], eos_token_id=vocab["</s>"])
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


PAIRS = pd.DataFrame({
    "prompt_a": ["What is the capital of France?", "Who wrote Hamlet?", "How tall is Everest?"],
    "prompt_b": ["France capital city?", "Hamlet was written by whom, and in which year?",
                 "Everest height?"],
})


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    texts = PAIRS["prompt_a"].tolist() + PAIRS["prompt_b"].tolist()
    return build_tiny_chat_lm(tmp_path_factory.mktemp("tiny-lm"), texts)


def test_answer_token_ids_take_first_tokens_that_spell_the_answer(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    yes, no = answer_token_ids(tok)
    vocab = tok.get_vocab()
    # "YES"/"NO" are unknown to this vocabulary: the unknown token counts for neither side
    assert yes == sorted([vocab["yes"], vocab["Yes"]])
    assert no == sorted([vocab["no"], vocab["No"]])


def test_hf_teacher_p_yes_equals_unbatched_next_token_probability(tiny_lm):
    import torch

    teacher = HFTeacher(_cfg(teacher="hf", teacher_model=str(tiny_lm), device="cpu", batch_size=8))
    out = teacher.label_batch(PAIRS)
    assert out["error"].isna().all() and set(out["teacher"]) == {f"hf:{tiny_lm}"}
    expected = []
    for a, b in zip(PAIRS.prompt_a, PAIRS.prompt_b):  # one at a time: no padding at all
        text = teacher.tokenizer.apply_chat_template(judge_messages(a, b), add_generation_prompt=True,
                                                     tokenize=False)
        assert text.endswith("assistant :") and a in text
        ids = teacher.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = teacher.model(torch.tensor([ids])).logits[0, -1]
        p = torch.softmax(logits, -1)
        p_yes, p_no = p[teacher.yes_ids].sum(), p[teacher.no_ids].sum()
        expected.append(float(p_yes / (p_yes + p_no)))
    np.testing.assert_allclose(out["label"].to_numpy(), expected, rtol=1e-4, atol=1e-6)
    assert np.ptp(expected) > 1e-3  # the pairs really get different labels


def test_hf_teacher_refuses_pairs_over_the_context(tiny_lm):
    teacher = HFTeacher(_cfg(teacher="hf", teacher_model=str(tiny_lm), device="cpu",
                             max_model_len=128))
    lengths = [len(teacher.tokenizer(teacher.prompt_text(a, b), add_special_tokens=False)["input_ids"])
               for a, b in zip(PAIRS.prompt_a, PAIRS.prompt_b)]
    assert min(lengths) <= 128 < max(lengths), lengths  # the config really splits the pairs
    out = teacher.label_batch(PAIRS)
    for n, label, error in zip(lengths, out["label"], out["error"]):
        assert (error == CONTEXT_TOO_LONG and math.isnan(label)) if n > 128 else (0 <= label <= 1)
    by_chars = HFTeacher(_cfg(teacher="hf", teacher_model=str(tiny_lm), device="cpu",
                              max_prompt_chars=55)).label_batch(PAIRS)
    assert by_chars["error"].tolist() == [None, CONTEXT_TOO_LONG, None]


def test_hf_teacher_setup_errors(tmp_path, tiny_lm):
    with pytest.raises(ConfigError, match="--teacher-model"):
        HFTeacher.check_config(_cfg(teacher="hf"))
    with pytest.raises(TeacherError, match="not a local folder"):
        HFTeacher(_cfg(teacher="hf", teacher_model="no-such-org/no-such-model", device="cpu"))
    plain = build_tiny_chat_lm(tmp_path / "plain", with_chat_template=False)
    with pytest.raises(TeacherError, match="no chat template"):
        HFTeacher(_cfg(teacher="hf", teacher_model=str(plain), device="cpu"))


# --------------------------------------------------------------------------- openai


def _logprob_body(yes: float, no: float, chosen: str = "Yes") -> dict:
    """A chat-completions body whose first token has P("Yes")=yes·0.75, P(" yes")=yes·0.25, P("No")=no."""
    top = [{"token": "Yes", "logprob": math.log(yes * 0.75)},
           {"token": " yes", "logprob": math.log(yes * 0.25)},
           {"token": "No", "logprob": math.log(no)},
           {"token": "Maybe", "logprob": math.log(0.01)}]
    first = next(t for t in top if t["token"] == chosen)
    return {"id": "x", "object": "chat.completion", "choices": [{
        "index": 0, "finish_reason": "length",
        "message": {"role": "assistant", "content": chosen},
        "logprobs": {"content": [{**first, "top_logprobs": top}]}}]}


class FakeChatServer:
    """An OpenAI-style /v1/chat/completions server on 127.0.0.1; behaviour keyed by markers in
    the user message. Records every request (headers, body) and the peak number in flight."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.seen: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    server.in_flight += 1
                    server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
                    user = body["messages"][-1]["content"]
                    server.seen[user] = server.seen.get(user, 0) + 1
                    attempt = server.seen[user]
                try:
                    status, payload, headers = server.respond(user, attempt)
                    if server.delay_s:
                        time.sleep(server.delay_s)
                    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def respond(self, user: str, attempt: int):
        if "RATE_LIMITED" in user and attempt == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
        if "FLAKY" in user and attempt <= 2:
            return 500, {"error": {"message": "internal"}}, {}
        if "DOWN" in user:
            return 503, {"error": {"message": "unavailable"}}, {}
        if "TOO_LONG" in user:
            return 400, {"error": {"message": "maximum context length exceeded"}}, {}
        if "NOT_JSON" in user:
            return 200, b'{"choices": [ {"message": ', {}
        if "BAD_GZIP" in user:
            return 200, b"this is not gzip", {"Content-Encoding": "gzip"}
        if "NO_CHOICES" in user:
            return 200, {"object": "chat.completion", "choices": []}, {}
        if "TEXT_ONLY" in user:
            return 200, {"choices": [{"message": {"role": "assistant", "content": " No."}}]}, {}
        if "CHATTY" in user:
            return 200, {"choices": [{"message": {"content": "I think yes"}, "logprobs": None}]}, {}
        if "SLOW" in user:
            time.sleep(1.0)
        if "SAME" in user:
            return 200, _logprob_body(0.8, 0.1), {}
        return 200, _logprob_body(0.05, 0.9, chosen="No"), {}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def chat_server():
    server = FakeChatServer()
    yield server
    server.close()


def _openai_cfg(server, **kw) -> LabelConfig:
    kw = {"teacher": "openai", "endpoint": server.url, "teacher_model": "judge-7b",
          "backoff_s": 0.0, "max_retries": 2, "timeout_s": 5.0, **kw}
    return _cfg(**kw)


def _pairs(*markers: str) -> pd.DataFrame:
    return pd.DataFrame({"prompt_a": [f"question {m}" for m in markers],
                         "prompt_b": [f"other question {i}" for i in range(len(markers))]})


def test_openai_teacher_labels_from_logprobs_with_key_and_schema(chat_server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-123")
    teacher = OpenAITeacher(_openai_cfg(chat_server, api_key_env="JUDGE_KEY", top_logprobs=7))
    out = teacher.label_batch(_pairs("SAME", "DIFFERENT"))
    assert out["error"].isna().all()
    np.testing.assert_allclose(out["label"], [0.8 / 0.9, 0.05 / 0.95])
    assert set(out["teacher"]) == {"openai:judge-7b"}
    req = chat_server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test-123"
    body = req["body"]
    assert body["model"] == "judge-7b" and body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 7
    assert body["messages"][0]["content"] == SYSTEM_MESSAGE
    assert "question SAME" in body["messages"][1]["content"]


def test_openai_teacher_retries_429_and_5xx_then_gives_up_with_an_error(chat_server):
    teacher = OpenAITeacher(_openai_cfg(chat_server, max_retries=2))
    out = teacher.label_batch(_pairs("RATE_LIMITED SAME", "FLAKY SAME", "DOWN", "TOO_LONG"))
    assert out["label"].iloc[0] == pytest.approx(0.8 / 0.9)
    assert out["label"].iloc[1] == pytest.approx(0.8 / 0.9)
    assert out["error"].iloc[:2].isna().all()
    assert out["error"].iloc[2].startswith("HTTP 503") and "after 2 retries" in out["error"].iloc[2]
    assert out["error"].iloc[3].startswith("HTTP 400") and "context length" in out["error"].iloc[3]
    assert out["label"].iloc[2:].isna().all()
    tries = {k.split("\n")[1]: v for k, v in chat_server.seen.items()}
    assert tries == {"question RATE_LIMITED SAME": 2, "question FLAKY SAME": 3,
                     "question DOWN": 3, "question TOO_LONG": 1}  # 4xx other than 429: no retry


def test_openai_teacher_survives_malformed_and_text_only_answers(chat_server):
    teacher = OpenAITeacher(_openai_cfg(chat_server))
    out = teacher.label_batch(_pairs("NOT_JSON", "NO_CHOICES", "TEXT_ONLY", "CHATTY", "BAD_GZIP"))
    assert out["error"].iloc[0].startswith("malformed response: not JSON")
    assert out["error"].iloc[1] == "malformed response: no choices"
    assert out["label"].iloc[2] == 0.0 and out["error"].iloc[2] is None  # strict parse of " No."
    assert out["error"].iloc[3] == "unparseable answer: 'I think yes'"
    assert out["error"].iloc[4].startswith("request failed: DecodingError")
    assert out["label"].isna().tolist() == [True, True, False, True, True]


def test_openai_teacher_timeout_and_unreachable_endpoint(chat_server):
    slow = OpenAITeacher(_openai_cfg(chat_server, timeout_s=0.2, max_retries=1))
    out = slow.label_batch(_pairs("SLOW"))
    assert out["error"].iloc[0] == "timed out after 0.2 s (after 1 retries)"
    port = chat_server.httpd.server_address[1]
    chat_server.close()
    gone = OpenAITeacher(_openai_cfg(chat_server, endpoint=f"http://127.0.0.1:{port}/v1", max_retries=0))
    assert gone.label_batch(_pairs("SAME"))["error"].iloc[0].startswith("connection error")
    chat_server.close = lambda: None  # already closed


def test_openai_teacher_bounds_requests_in_flight():
    server = FakeChatServer(delay_s=0.05)
    try:
        teacher = OpenAITeacher(_openai_cfg(server, concurrency=3))
        out = teacher.label_batch(_pairs(*["SAME"] * 12))
    finally:
        server.close()
    assert out["error"].isna().all() and len(server.requests) == 12
    assert 1 <= server.peak_in_flight <= 3


def test_openai_teacher_config_checks():
    with pytest.raises(ConfigError, match="--endpoint"):
        OpenAITeacher.check_config(_cfg(teacher="openai", teacher_model="m"))
    with pytest.raises(ConfigError, match="--teacher-model"):
        OpenAITeacher.check_config(_cfg(teacher="openai", endpoint="http://h/v1"))
    with pytest.raises(ConfigError, match="http"):
        OpenAITeacher.check_config(_cfg(teacher="openai", endpoint="h:8000", teacher_model="m"))


def test_chat_url_and_retry_delay():
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    assert retry_delay(0, 0.5) == 0.5 and retry_delay(3, 0.5) == 4.0
    assert retry_delay(2, 0.5, "7") == 7.0  # Retry-After in seconds wins over backoff
    assert retry_delay(0, 0.5, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a past HTTP date
    assert retry_delay(0, 0.5, "soon") == 0.5  # unparseable header: plain backoff
    assert retry_delay(30, 1.0) == 120.0


def test_judgement_from_chat_response_prefers_logprobs_over_text():
    body = _logprob_body(0.3, 0.6, chosen="No")
    body["choices"][0]["message"]["content"] = "yes"  # text disagrees: log-probs win
    assert judgement_from_chat_response(body) == (pytest.approx(1 / 3), None)
    assert judgement_from_chat_response([1, 2])[1] == "malformed response: no choices"


# --------------------------------------------------------------------------- in the Ray job


@pytest.mark.ray
def test_hf_teacher_in_the_ray_job_matches_direct_labels(ray_local, tmp_path, tiny_lm):
    from raycache.data import read_pairs, write_table
    from raycache.labeling import job

    write_table(PAIRS, tmp_path / "pairs.jsonl")
    cfg = LabelConfig(pairs=str(tmp_path / "pairs.jsonl"), out=str(tmp_path / "out"), teacher="hf",
                      teacher_model=str(tiny_lm), device="cpu", batch_size=2)
    summary = job.run(cfg)
    assert summary["labelled"] == 3 and summary["teacher"] == f"hf:{tiny_lm}"
    got = read_pairs(tmp_path / "out").set_index("prompt_a")["label"]
    direct = HFTeacher(cfg).label_batch(PAIRS).set_index("prompt_a")["label"]
    np.testing.assert_allclose(got[direct.index], direct, rtol=1e-4, atol=1e-6)


@pytest.mark.ray
def test_openai_teacher_in_the_ray_job(ray_local, tmp_path, chat_server):
    from raycache.data import read_pairs, write_table
    from raycache.labeling import job

    write_table(_pairs("SAME", "DIFFERENT", "CHATTY", "RATE_LIMITED SAME"), tmp_path / "pairs.jsonl")
    cfg = _openai_cfg(chat_server, concurrency=2, max_error_rate=0.3)
    summary = job.run(cfg.model_copy(update={"pairs": str(tmp_path / "pairs.jsonl"),
                                              "out": str(tmp_path / "out")}))
    assert summary["labelled"] == 3 and summary["errors"] == 1
    assert summary["error_examples"] == ["unparseable answer: 'I think yes'"]
    out = read_pairs(tmp_path / "out").set_index("prompt_a")
    np.testing.assert_allclose(out.loc[["question SAME", "question DIFFERENT", "question RATE_LIMITED SAME"],
                                       "label"], [0.8 / 0.9, 0.05 / 0.95, 0.8 / 0.9])
    assert len(chat_server.requests) == 5  # four pairs, one retried after its 429
