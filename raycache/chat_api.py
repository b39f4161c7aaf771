"""The OpenAI-compatible chat API's endpoint forms, shared by the OpenAI teacher (labeling) and the
service's upstream client: :func:`chat_completions_url`. Imports nothing from raycache, so either side
can use it without an import cycle."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["chat_completions_url"]

SUFFIX = "/chat/completions"


def chat_completions_url(base_url: str) -> str:
    """The ``POST`` URL of chat completions for an endpoint: ``<base>/chat/completions``; a base
    without a path gets the usual ``/v1`` (``http://host:8000`` and ``http://host:8000/v1`` both
    work) and a full ``…/chat/completions`` URL is kept. ValueError unless it is an http(s) URL."""
    base = base_url.rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"upstream must be an http(s) URL, got {base_url!r}")
    if base.endswith(SUFFIX):
        return base
    if parts.path in ("", "/"):
        base += "/v1"
    return base + SUFFIX
