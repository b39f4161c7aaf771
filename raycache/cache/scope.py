"""Cache scopes: who may share an entry.

A scope is a namespace (tenant, model, system prompt: whatever the caller uses to separate caches)
plus a hash of the conversation before the prompt. A lookup only ever sees entries of its own scope,
so a follow-up such as "What are its types?" never hits an entry stored in another conversation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

MAX_NAMESPACE_CHARS = 256


TAIL_SEPARATOR = ":"  # history_hash of a long prompt's scope: "<history hash>:<tail key>"


@dataclass(frozen=True, order=True)
class Scope:
    """Namespace + conversation hash ("" = no earlier turns).

    A prompt longer than the encoder's window lives in a sub-scope whose ``history_hash`` also
    names its unembedded tail (``"<history hash>:<tail key>"``, see :func:`tail_key`): it can only
    ever match prompts whose text beyond the window is the same, character for character.
    """

    namespace: str
    history_hash: str = ""

    @property
    def root(self) -> "Scope":
        """The scope without any tail: namespace + conversation."""
        if TAIL_SEPARATOR not in self.history_hash:
            return self
        return Scope(self.namespace, self.history_hash.split(TAIL_SEPARATOR, 1)[0])

    def with_tail(self, tail: Optional[str]) -> "Scope":
        """The sub-scope of prompts whose unembedded tail has key ``tail`` ("" / None: this scope)."""
        if not tail:
            return self
        return Scope(self.namespace, f"{self.root.history_hash}{TAIL_SEPARATOR}{tail}")


def history_hash(history: Optional[Sequence[Any]]) -> str:
    """Stable 32-hex-digit hash of earlier turns (strings or JSON-like messages); "" for none.

    The turns are serialised as canonical JSON (sorted keys), so dict key order does not matter but
    every role, content and order of turns does.
    """
    if history is None or len(history) == 0:
        return ""
    if isinstance(history, (str, bytes)):
        raise ValueError("history must be a list of earlier turns, not a single string")
    try:
        canonical = json.dumps(list(history), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"history must be JSON-serialisable turns (strings or messages): {exc}") from None
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def tail_key(tail: str) -> str:
    """Key of a prompt's text beyond the encoder's window ("" when the whole prompt was embedded):
    32 hex digits of a hash of the exact characters."""
    if not tail:
        return ""
    return hashlib.blake2b(tail.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def make_scope(namespace: str, history: Optional[Sequence[Any]] = None) -> Scope:
    """Validate the namespace and build the scope of a lookup or entry."""
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")
    if len(namespace) > MAX_NAMESPACE_CHARS:
        raise ValueError(f"namespace is {len(namespace)} characters; the limit is {MAX_NAMESPACE_CHARS}")
    return Scope(namespace, history_hash(history))
