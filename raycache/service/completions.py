"""The OpenAI chat completion wire format as the proxy reads and writes it: the cacheable answers of
a completion (:func:`answer_contents`) or of its SSE stream (:class:`StreamAssembler`), and a cache hit
as a ``chat.completion`` object (:func:`cached_completion`) or replayed as ``chat.completion.chunk``
SSE events (:func:`replay_events`). A stored response holds one answer, or ``{"choices": [...]}``
for ``n`` > 1 (:func:`cached_contents`)."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Iterator, Optional

from raycache.service.upstream import is_strict_json

__all__ = ["REPLAY_WORDS_PER_CHUNK", "StreamAssembler", "answer_contents", "cached_completion",
           "cached_contents", "hit_info", "replay_events", "replay_pieces", "sse_event"]

REPLAY_WORDS_PER_CHUNK = 4  # words per SSE chunk when a cached answer is streamed


class StreamAssembler:
    """Reads an OpenAI chat-completion SSE stream line by line and assembles each choice's text.

    ``feed(line)`` returns "done" at ``data: [DONE]``. ``contents()``: the ``n`` answers when the
    stream is complete and cacheable (every choice finished with 'stop', text only), else None.
    """

    def __init__(self, n: int = 1):
        self.n = n
        self.parts: dict[int, list[str]] = {}
        self.finish: dict[int, Any] = {}
        self.cacheable = True
        self.done = False

    def feed(self, line: bytes) -> Optional[str]:
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith("data:"):
            return None
        data = text[5:].strip()
        if data == "[DONE]":
            self.done = True
            return "done"
        try:
            chunk = json.loads(data)
        except ValueError:
            self.cacheable = False
            return None
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not isinstance(choices, list) or "error" in chunk:
            self.cacheable = False
            return None
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
                self.cacheable = False
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict) or delta.get("tool_calls") or delta.get("function_call"):
                self.cacheable = False
                continue
            content = delta.get("content")
            if isinstance(content, str):
                self.parts.setdefault(index, []).append(content)
            elif content is not None:
                self.cacheable = False
            if choice.get("finish_reason") is not None:
                self.finish[index] = choice["finish_reason"]
        return None

    def contents(self) -> Optional[list[str]]:
        if not self.cacheable or sorted(self.finish) != list(range(self.n)):
            return None
        if any(reason != "stop" for reason in self.finish.values()):
            return None
        answers = ["".join(self.parts.get(i, [])) for i in range(self.n)]
        if not all(a.strip() and is_strict_json(a) for a in answers):
            return None
        return answers


def answer_contents(choices: Any, n: int) -> Optional[list[str]]:
    """The ``n`` text answers of a completion's choices when it can be cached (each finished with
    'stop' or no reason, text content, no tool calls), else None."""
    if not isinstance(choices, list) or len(choices) != n:
        return None
    out = []
    for choice in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index", 0), int) else 0):
        message = choice.get("message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        if (not isinstance(content, str) or not content.strip() or message.get("tool_calls")
                or message.get("function_call") or choice.get("finish_reason") not in (None, "stop")):
            return None
        out.append(content)
    return out


def cached_contents(response: str, n: int) -> Optional[list[str]]:
    """The ``n`` answers a stored response holds (one string; for n > 1, ``{"choices": [...]}``);
    None when it does not hold ``n`` (then the request is treated as a miss)."""
    if n == 1:
        return [response]
    try:
        data = json.loads(response)
    except ValueError:
        return None
    choices = data.get("choices") if isinstance(data, dict) else None
    if isinstance(choices, list) and len(choices) == n and all(isinstance(c, str) for c in choices):
        return choices
    return None


def hit_info(found: dict) -> dict:
    return {"hit": True, "similarity": found["similarity"], "exact": found["exact"],
            "matched_prompt": found["matched_prompt"], "entry_id": found["entry_id"]}


def cached_completion(model: str, found: dict, contents: list[str]) -> dict:
    """An OpenAI chat.completion object answering from the cache (token usage 0: no LLM call)."""
    return {
        "id": f"chatcmpl-raycache-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop", "logprobs": None} for i, content in enumerate(contents)],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "raycache": hit_info(found),
    }


def replay_pieces(text: str, words: int = REPLAY_WORDS_PER_CHUNK) -> list[str]:
    """``text`` cut into pieces of a few words (whitespace kept) whose concatenation is ``text``."""
    tokens = re.findall(r"\s*\S+|\s+$", text)
    return ["".join(tokens[i:i + words]) for i in range(0, len(tokens), words)] or [text]


def sse_event(data: Any) -> bytes:
    """One SSE event: ``data: <JSON>`` and a blank line."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


def replay_events(model: str, found: dict, contents: list[str], stream_options: Any) -> Iterator[bytes]:
    """A cache hit for ``stream: true``: OpenAI ``chat.completion.chunk`` SSE events (a role chunk,
    the text in pieces, a finish chunk, the usage chunk if ``stream_options.include_usage``),
    then ``data: [DONE]``. The id and ``created`` are fixed when this is called."""
    base = {"id": f"chatcmpl-raycache-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}

    def chunk(index: int, delta: dict, finish: Optional[str] = None) -> dict:
        return {**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                     "logprobs": None}]}

    def events():
        for index, content in enumerate(contents):
            yield sse_event({**chunk(index, {"role": "assistant", "content": ""}), "raycache": hit_info(found)})
            for piece in replay_pieces(content):
                yield sse_event(chunk(index, {"content": piece}))
            yield sse_event(chunk(index, {}, "stop"))
        if isinstance(stream_options, dict) and stream_options.get("include_usage"):
            yield sse_event({**base, "choices": [],
                             "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
        yield b"data: [DONE]\n\n"

    return events()
