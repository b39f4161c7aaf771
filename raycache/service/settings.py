"""The HTTP API's settings (:class:`ApiSettings`: limits, upstream, chat keying) and its API keys
(:class:`KeyGrant`, SHA-256 digests, the ``--api-keys-file`` reader); the keys themselves never
reach the settings, only their digests."""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from raycache.cache.scope import MAX_NAMESPACE_CHARS
from raycache.config import CHAT_KEY_FIELDS, CHAT_UNKEYED_FIELDS

__all__ = ["ADMIN", "ApiSettings", "KeyGrant", "key_digest", "read_api_keys"]


class KeyGrant(BaseModel):
    """What one API key may reach: everything (``admin``) or only ``namespaces``."""

    model_config = ConfigDict(extra="forbid")

    admin: bool = False
    namespaces: list[str] = Field(default_factory=list)

    def holds(self, namespace: Optional[str]) -> bool:
        """May this key read and change ``namespace`` (None = every namespace: admin only)?"""
        return self.admin or (namespace is not None and namespace in self.namespaces)


ADMIN = KeyGrant(admin=True)


class ApiSettings(BaseModel):
    """Limits and wiring of the HTTP API. ``api_key_sha256``: hex SHA-256 of the admin API key;
    ``api_keys``: hex SHA-256 of each tenant key -> its grant (both empty = open); the keys
    themselves never reach the service's configuration."""

    model_config = ConfigDict(extra="forbid")

    api_key_sha256: Optional[str] = None
    api_keys: dict[str, KeyGrant] = Field(default_factory=dict)
    chat_key_fields: list[str] = Field(default_factory=lambda: list(CHAT_KEY_FIELDS))
    chat_unkeyed_fields: list[str] = Field(default_factory=lambda: list(CHAT_UNKEYED_FIELDS))
    chat_cache_tools: bool = False
    chat_cache_n: bool = False
    max_request_bytes: int = 1_000_000
    max_prompt_chars: int = 8000
    max_batch_prompts: int = 256
    upstream: Optional[str] = None
    upstream_timeout_s: float = 60.0
    upstream_api_key_env: str = "UPSTREAM_API_KEY"


def key_digest(api_key: Optional[str]) -> Optional[str]:
    """Hex SHA-256 of an API key; None for an unset or empty key."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


def read_api_keys(path: str) -> dict[str, KeyGrant]:
    """``--api-keys-file``: a JSON object ``{KEY: {"namespaces": [...]}}`` or ``{KEY: {"admin": true}}``
    -> {SHA-256 of KEY: grant}. ValueError naming the problem (never the key)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read the API keys file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object of KEY: grant")
    grants = {}
    for n, (key, grant) in enumerate(data.items(), 1):
        where = f"{path}: key #{n}"
        if not isinstance(key, str) or len(key.strip()) < 8 or key != key.strip():
            raise ValueError(f"{where}: a key must be a string of at least 8 characters, no outer spaces")
        if not isinstance(grant, dict) or set(grant) - {"admin", "namespaces"} or (
                grant.get("admin") is not True and "namespaces" not in grant):
            raise ValueError(f'{where}: expected {{"namespaces": [...]}} or {{"admin": true}}')
        spaces = grant.get("namespaces", [])
        if not isinstance(spaces, list) or not all(
                isinstance(ns, str) and 0 < len(ns) <= MAX_NAMESPACE_CHARS for ns in spaces):
            raise ValueError(f"{where}: namespaces must be a list of 1..{MAX_NAMESPACE_CHARS}-character strings")
        grants[key_digest(key)] = KeyGrant(admin=grant.get("admin") is True, namespaces=spaces)
    return grants
