"""How an OpenAI chat request maps to the cache: its prompt and scope history, or why it bypasses.

:func:`chat_key` splits ``messages`` into the prompt (the last, text, user message) and the history
that scopes it (the model, the keyed request fields and every earlier message). :class:`ChatKeyPolicy`
is the proxy's rule on top: which request fields are keyed, which are known to leave the answer
unchanged, and which requests (unknown fields, ``n`` > 1, tools) pass through uncached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

__all__ = ["CHAT_TRANSPORT_FIELDS", "ChatKey", "ChatKeyPolicy", "TOOL_FIELDS", "chat_key", "message_text"]

# request fields the proxy handles itself: never part of the key, never "unknown"
CHAT_TRANSPORT_FIELDS = ("model", "messages", "stream", "stream_options")
TOOL_FIELDS = ("tools", "functions")


def message_text(content: Any) -> Optional[str]:
    """Text of an OpenAI chat message ``content`` (a string or a list of parts); None if it holds
    anything but text (images, audio), which the cache does not key on."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                return None
            texts.append(part["text"])
        return "\n".join(texts)
    return None


@dataclass(frozen=True)
class ChatKey:
    """How a chat request is cached: the prompt (last user message) and the context it depends on."""

    prompt: str
    history: list


def chat_key(messages: Sequence[Any], model: str, context: Optional[dict] = None) -> Optional[ChatKey]:
    """Split an OpenAI ``messages`` list into (prompt, history) for the cache; None if uncacheable.

    The prompt is the last message, which must be a text user message. The history is a context
    record (the model plus ``context``, e.g. tools) followed by every earlier message, system prompt
    included, so the scope hash covers model, system prompt and earlier turns.
    """
    if not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    prompt = message_text(last.get("content"))
    if prompt is None or not prompt.strip():
        return None
    header = {"model": model, **(context or {})}
    return ChatKey(prompt=prompt, history=[{"context": header}, *messages[:-1]])


class ChatKeyPolicy:
    """Which chat requests the proxy caches, and under which key.

    ``keyed_fields``: request fields that change the answer (part of the key); ``unkeyed_fields``:
    fields known to leave it unchanged (``stream`` and ``stream_options`` always are); any other
    field makes the request bypass the cache. ``cache_tools`` / ``cache_n``: cache requests that
    offer tools / ask for ``n`` > 1 (bypassed otherwise).
    """

    def __init__(self, keyed_fields: Iterable[str], unkeyed_fields: Iterable[str],
                 cache_tools: bool = False, cache_n: bool = False):
        self.keyed_fields = frozenset(keyed_fields) - set(CHAT_TRANSPORT_FIELDS)
        self.unkeyed_fields = (frozenset(unkeyed_fields) | {"stream", "stream_options"}) - self.keyed_fields
        self.cache_tools = cache_tools
        self.cache_n = cache_n

    def info(self) -> dict:
        """The policy as ``/v1/cache/stats`` reports it (``chat_key``)."""
        return {
            "keyed_fields": ["model", "messages", *sorted(self.keyed_fields)],
            "unkeyed_fields": sorted(self.unkeyed_fields),
            "other_fields": "bypass",
            "cache_tools": self.cache_tools, "cache_n": self.cache_n,
        }

    def key(self, body: dict) -> tuple[Optional[ChatKey], Optional[str]]:
        """(ChatKey, None) for a cacheable request ``body``, else (None, why it bypasses the cache)."""
        fields = set(body) - set(CHAT_TRANSPORT_FIELDS)
        unknown = sorted(fields - self.keyed_fields - self.unkeyed_fields)
        if unknown:
            return None, (f"request field(s) {', '.join(unknown)[:200]} are neither keyed nor known "
                          f"to leave the answer unchanged (serve --chat-key-fields / --chat-unkeyed-fields)")
        if body.get("n", 1) != 1 and not self.cache_n:
            return None, "n > 1 (serve --chat-cache-n caches it)"
        if not self.cache_tools and (
                any(body.get(f) for f in TOOL_FIELDS) or
                body.get("tool_choice", "none") != "none" or body.get("function_call", "none") != "none"):
            return None, "the request offers tools (serve --chat-cache-tools caches it)"
        key = chat_key(body["messages"], body["model"],
                       {f: body[f] for f in sorted(fields & self.keyed_fields)})
        if key is None:
            return None, "the last message is not a text user message"
        return key, None
