"""Client for the OpenAI-compatible server behind the cache (vLLM, OpenAI, any compatible API)."""

from __future__ import annotations

import json
from typing import Any, Optional

import httpx

from raycache.chat_api import chat_completions_url

MAX_ERROR_CHARS = 500  # of an upstream error body quoted back to the client


def is_strict_json(value: Any) -> bool:
    """Whether ``value`` serialises to standard JSON in UTF-8: no NaN/Infinity, no lone surrogates
    (Python's json module reads both, but neither can be sent on or answered)."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        return False
    return True


class UpstreamError(Exception):
    """The upstream failed or answered an error (``status``: its HTTP status, None if unreachable;
    ``retry_after``: seconds, from its Retry-After header when it sent one)."""

    def __init__(self, message: str, status: Optional[int] = None, retry_after: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> Optional[str]:
    value = response.headers.get("retry-after", "").strip()
    return value if value.isdigit() and len(value) <= 6 else None


def completion_problem(data: Any) -> Optional[str]:
    """Why ``data`` is not a chat completion the proxy can read (None if it is): ``choices`` must
    be a list of objects, each ``message`` (when present) an object."""
    if not isinstance(data, dict):
        return "upstream answered JSON that is not an object"
    choices = data.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        return "upstream answered a completion whose 'choices' is not a list of objects"
    if any(not isinstance(c.get("message", {}), dict) for c in choices):
        return "upstream answered a completion whose 'message' is not an object"
    return None


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the timeout."""


class UpstreamClient:
    """Async client of ``POST <base>/chat/completions`` with a timeout (seconds) and optional key;
    ``transport`` replaces the network (httpx.MockTransport in tests)."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, timeout_s: float = 60.0,
                 transport: Optional[httpx.AsyncBaseTransport] = None):
        self.url = chat_completions_url(base_url)
        self._api_key = api_key
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=headers, transport=transport)

    async def chat_completion(self, body: dict) -> dict:
        """The upstream's JSON completion for ``body`` (non-streaming)."""
        try:
            response = await self._client.post(self.url, json=body)
        except httpx.TimeoutException:
            raise UpstreamTimeout("upstream timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise UpstreamError(f"upstream answered {response.status_code}: {self._quote(response.text)}",
                                response.status_code, _retry_after(response))
        try:
            data = response.json()
        except ValueError:
            raise UpstreamError("upstream answered invalid JSON", response.status_code) from None
        problem = completion_problem(data)
        if problem:
            raise UpstreamError(problem, response.status_code)
        if not is_strict_json(data):
            raise UpstreamError("upstream answered JSON with NaN/Infinity or invalid unicode (lone "
                                "surrogates)", response.status_code)
        return data

    async def open_stream(self, body: dict) -> httpx.Response:
        """Start a streaming completion; the caller iterates ``aiter_bytes()`` and must ``aclose()``."""
        request = self._client.build_request("POST", self.url, json=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise UpstreamTimeout("upstream timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}") from None
        if response.status_code >= 400:
            text = (await response.aread()).decode("utf-8", "replace")
            await response.aclose()
            raise UpstreamError(f"upstream answered {response.status_code}: {self._quote(text)}",
                                response.status_code, _retry_after(response))
        return response

    def _quote(self, text: str) -> str:
        """An upstream error body as quoted to the client: the API key redacted (an upstream may
        echo it back), then cut to MAX_ERROR_CHARS."""
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        return text[:MAX_ERROR_CHARS]

    async def aclose(self) -> None:
        await self._client.aclose()
