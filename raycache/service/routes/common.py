"""What every route shares: the API-key and body-size guard (:class:`RequestGuard`), the request
checks (text, prompt, history), namespace authorisation, and the one error shape: JSON
``{"error": {"message", "type", "code"}}`` with a 4xx/5xx status (:func:`install_error_handlers`).
A failing cache backend is a 503 with Retry-After (:func:`from_backend`), never a 500."""

from __future__ import annotations

import hmac
import logging
from typing import Any, Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from raycache.service.settings import ADMIN, ApiSettings, KeyGrant, key_digest
from raycache.service.upstream import is_strict_json

logger = logging.getLogger(__name__)

__all__ = ["OPEN_PATHS", "PRINCIPAL", "RETRY_AFTER_S", "RequestGuard", "authorize", "check_history",
           "check_prompt", "check_text", "error_response", "fail", "from_backend", "install_error_handlers"]

OPEN_PATHS = ("/healthz",)
RETRY_AFTER_S = "1"  # seconds a client should wait after a 503 from the cache
PRINCIPAL = "raycache.principal"  # ASGI scope key: the KeyGrant of the request's key

_KIND = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed",
         413: "request_too_large", 422: "invalid_request", 502: "upstream_error",
         503: "unavailable", 504: "upstream_timeout"}


# ----------------------------------------------------------------------------- errors
def error_response(status: int, message: str, kind: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status, headers=headers)


def fail(status: int, message: str, headers: Optional[dict] = None) -> HTTPException:
    """The exception a route raises to answer ``status`` with ``message`` (in the error shape)."""
    return HTTPException(status_code=status, detail=message, headers=headers)


async def from_backend(call: Awaitable[Any], what: str) -> Any:
    """Await a cache backend call; its failure (a replica or the embedder down, overloaded or
    restarting) is a 503 with Retry-After, not a 500. Bad input never gets here (validated first)."""
    try:
        return await call
    except HTTPException:
        raise
    except Exception as exc:
        logger.error("cache %s failed: %s", what, type(exc).__name__, exc_info=exc)
        raise fail(503, f"the cache is unavailable ({what} failed: {type(exc).__name__}); retry",
                   {"retry-after": RETRY_AFTER_S}) from None


def _describe_validation(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "request body is not valid JSON"
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return 422, "request body must be a JSON object (Content-Type: application/json)"
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return 422, "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Every error of ``app`` in the error shape: validation 400/422, raised HTTP errors with their
    status (and headers), anything else a logged 500 ``internal error`` without a stack trace."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _describe_validation(exc)
        return error_response(status, message, _KIND[status])

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), _KIND.get(exc.status_code, "error"),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error serving %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error", "internal_error")


# ----------------------------------------------------------------------------- request checks
def check_text(text: str, what: str) -> None:
    if not is_strict_json(text):  # the encoder and the JSON answers cannot take it
        raise fail(422, f"{what} is not valid unicode (it holds a lone surrogate such as \\ud800)")


def check_prompt(prompt: str, max_chars: int, what: str = "prompt") -> None:
    """422 unless ``prompt`` is valid unicode, not blank and at most ``max_chars`` characters."""
    check_text(prompt, what)
    if not prompt.strip():
        raise fail(422, f"{what} must not be empty")
    if len(prompt) > max_chars:
        raise fail(422, f"{what} is {len(prompt)} characters; the limit is {max_chars}")


def check_history(history: Optional[list]) -> None:
    if history is not None and not is_strict_json(history):
        raise fail(422, "history holds NaN/Infinity or invalid unicode (lone surrogates)")


def authorize(request: Request, namespace: Optional[str]) -> None:
    """403 unless the request's key holds ``namespace`` (None: every namespace, admin only)."""
    grant = request.scope.get(PRINCIPAL) or ADMIN
    if not grant.holds(namespace):
        what = "every namespace (an admin key)" if namespace is None else f"namespace {namespace!r}"
        raise fail(403, f"this API key does not hold {what}")


# ----------------------------------------------------------------------------- middleware
class RequestGuard:
    """ASGI middleware: the API key on every route but OPEN_PATHS, then the body size limit.

    The key's grant (admin, or the namespaces it holds) is put in the ASGI scope under
    ``PRINCIPAL`` for the routes to check. The body is read here (at most ``max_request_bytes``) and
    replayed to the app, so chunked bodies are limited too. Keys are compared as SHA-256 digests
    (the admin key in constant time) and never logged.
    """

    def __init__(self, app: Any, settings: ApiSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        grant = self._grant(headers)
        if grant is None and path not in OPEN_PATHS:
            await error_response(401, "missing or invalid API key (send 'Authorization: Bearer KEY' "
                                      "or 'x-api-key: KEY')", "unauthorized",
                                 {"www-authenticate": "Bearer"})(scope, receive, send)
            return
        scope[PRINCIPAL] = grant
        limit = self.settings.max_request_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                await self._too_large(scope, receive, send)
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _grant(self, headers: dict[str, str]) -> Optional[KeyGrant]:
        """The grant of the request's key: ADMIN when the service has no keys; None when the key
        is missing or wrong."""
        settings = self.settings
        if not settings.api_key_sha256 and not settings.api_keys:
            return ADMIN
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        if not key:
            return None
        digest = key_digest(key)
        if settings.api_key_sha256 and hmac.compare_digest(digest, settings.api_key_sha256):
            return ADMIN
        return settings.api_keys.get(digest)

    async def _too_large(self, scope: dict, receive: Callable, send: Callable) -> None:
        await error_response(413, f"request body exceeds {self.settings.max_request_bytes} bytes",
                             "request_too_large")(scope, receive, send)
