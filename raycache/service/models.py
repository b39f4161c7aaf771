"""The HTTP API's request and response bodies (pydantic models, their limits in the OpenAPI schema):
lookups, stores, clears, health, and the OpenAI chat completion request the proxy accepts."""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from raycache.cache.scope import MAX_NAMESPACE_CHARS

__all__ = ["BatchLookupResponse", "BatchStoreResponse", "ChatCompletionRequest", "ChatMessage", "ClearResponse",
           "HealthResponse", "LookupRequest", "LookupResponse", "MAX_HISTORY_TURNS", "MAX_TTL_S", "StoreRequest",
           "StoreResponse", "Turn"]

MAX_HISTORY_TURNS = 1000
MAX_TTL_S = 10 * 365 * 86400.0


Turn = Union[str, dict[str, Any]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LookupRequest(_Request):
    """One prompt (``prompt``) or a batch (``prompts``) looked up in ``namespace``; ``history``: the
    earlier conversation turns (strings or ``{role, content}`` messages) that scope the lookup."""

    prompt: Optional[str] = Field(None, description="One prompt.")
    prompts: Optional[list[str]] = Field(None, description="A batch of prompts (instead of prompt).")
    namespace: str = Field("default", min_length=1, max_length=MAX_NAMESPACE_CHARS)
    history: Optional[list[Turn]] = Field(None, max_length=MAX_HISTORY_TURNS)


class LookupResponse(BaseModel):
    hit: bool
    response: Optional[str] = None
    similarity: Optional[float] = Field(None, description="Cosine to the nearest entry (1 = exact).")
    matched_prompt: Optional[str] = None
    entry_id: Optional[int] = None
    exact: bool = False


class BatchLookupResponse(BaseModel):
    results: list[LookupResponse]


class StoreRequest(_Request):
    """One entry (``prompt`` + ``response``) or a batch (``prompts`` + ``responses``, the same
    length) stored in ``namespace`` (+ ``history``), each with time to live ``ttl_s``."""

    prompt: Optional[str] = Field(None, description="One prompt (with response).")
    response: Optional[str] = Field(None, description="The response cached for prompt.")
    prompts: Optional[list[str]] = Field(None, description="A batch of prompts (instead of prompt).")
    responses: Optional[list[str]] = Field(None, description="One response per prompt of the batch.")
    namespace: str = Field("default", min_length=1, max_length=MAX_NAMESPACE_CHARS)
    history: Optional[list[Turn]] = Field(None, max_length=MAX_HISTORY_TURNS)
    ttl_s: Optional[float] = Field(None, gt=0, le=MAX_TTL_S, description="Time to live, seconds.")


class StoreResponse(BaseModel):
    entry_id: int


class BatchStoreResponse(BaseModel):
    entry_ids: list[int]


class ClearResponse(BaseModel):
    removed: int
    namespace: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Any = None


class ChatCompletionRequest(BaseModel):
    """OpenAI chat completion request; unknown fields are forwarded upstream untouched.
    ``namespace`` (or the ``x-raycache-namespace`` header) is raycache's and is not forwarded."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(..., min_length=1)
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    n: int = Field(1, ge=1)
    namespace: Optional[str] = Field(None, min_length=1, max_length=MAX_NAMESPACE_CHARS)


class HealthResponse(BaseModel):
    status: str
