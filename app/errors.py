"""The one table from domain errors to HTTP statuses, and the handlers that apply it.

Every error response is `{"error": {"code": <snake_case>, "message": <text>}}`; a 422 (and
a 400 `unsupported_parameter`) also carries FastAPI's per-field list under `error.detail`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.schemas import UNSUPPORTED_PARAMETER, ErrorBody, ErrorPublic
from service.errors import (
    ContextLostError,
    ContextNotFoundError,
    ContextNotReadyError,
    CorruptContextError,
    DocumentTooLongError,
    EngineUnavailableError,
    IncompatibleContextError,
    InvalidInputError,
    QuestionTooLongError,
    QueueFullError,
    ServiceError,
    StorageFullError,
    StorageQuotaExceededError,
    TooManyContextsError,
    UnsupportedRatioError,
)

__all__ = [
    "ERROR_DOCS",
    "ERROR_STATUS",
    "documented",
    "error_code",
    "error_response",
    "install_error_handlers",
    "invalid_field",
    "limit_exceeded",
    "status_of",
    "utf8_safe",
]

logger = logging.getLogger(__name__)

ERROR_STATUS: Mapping[type[ServiceError], int] = {
    InvalidInputError: 400,
    UnsupportedRatioError: 422,
    DocumentTooLongError: 413,
    QuestionTooLongError: 413,
    ContextNotFoundError: 404,
    ContextNotReadyError: 409,
    ContextLostError: 410,
    IncompatibleContextError: 409,
    CorruptContextError: 500,
    TooManyContextsError: 429,
    StorageQuotaExceededError: 507,
    StorageFullError: 507,
    QueueFullError: 503,
    EngineUnavailableError: 503,
}
"""Status of each domain error; a ServiceError subclass not listed here is a 500."""


def error_code(error_type: type[Exception]) -> str:
    """`ContextNotFoundError` -> `context_not_found`."""
    name = error_type.__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def status_of(error: ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


def utf8_safe(text: str) -> str:
    """`text` with lone UTF-16 surrogates (which JSON lets a client send) escaped, so it
    always encodes: `"\\ud800"` instead of a UnicodeEncodeError at response time."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    detail: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body = ErrorPublic(error=ErrorBody(code=code, message=utf8_safe(message), detail=detail))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def limit_exceeded(field: str, limit: float, given: float) -> RequestValidationError:
    """A 422 for a bound known only at run time ("max_new_tokens must be <= 1024. Given: 5000")."""
    return RequestValidationError(
        [
            {
                "type": "less_than_equal",
                "loc": ("body", field),
                "msg": f"{field} must be <= {limit}. Given: {given}",
                "input": given,
                "ctx": {"le": limit},
            }
        ]
    )


def invalid_field(field: str, message: str, given: Any) -> RequestValidationError:
    """A 422 for a rule across fields ("give exactly one of ttl_seconds or expire_time")."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", field), "msg": message, "input": given}]
    )


ERROR_DOCS = {
    400: "Input that can never succeed (empty text or question, a bad page_token, an expiry "
    "in the past), or on the OpenAI route a field it does not implement "
    "(`unsupported_parameter`, naming the field).",
    401: "No API key, or an unknown one (only when the server has API keys).",
    404: "No such context for this caller (unknown, expired, deleted, another tenant's, or a "
    "malformed id), or no such model.",
    409: "The context is still PROCESSING or FAILED, or was made by another model.",
    410: "The context lost its stored cache (evicted from the disk tier, or damaged in every "
    "tier): it is FAILED; register the same document again to rebuild it.",
    413: "The request body is over the size limit, the document has too many tokens, or the "
    "question (with a chat's instructions and earlier turns) does not fit what the model "
    "window leaves (the message gives both counts).",
    422: "Malformed body or a value out of range (the message names the field), such as a "
    "ratio below what method kvzip_head was measured to need (KVZIP_HEAD_MIN_RATIO).",
    429: "Over this key's request rate (retry after Retry-After seconds), or, registering a "
    "new document, the tenant holds its quota of contexts (KVZIP_TENANT_MAX_CONTEXTS).",
    503: "The work queue is full (retry after Retry-After seconds) or no engine is running.",
    507: "The tenant's contexts take its quota of storage (KVZIP_TENANT_MAX_BYTES), or the "
    "disk tier cannot hold the compressed context.",
}


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses (the envelope and when each happens)."""
    return {code: {"model": ErrorPublic, "description": ERROR_DOCS[code]} for code in codes}


_HTTP_CODES = {413: "request_too_large"}
"""Codes that read better than the status phrase ("request_entity_too_large")."""


async def handle_service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    status = status_of(exc)
    headers = None
    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if status >= 500 and status not in (503, 507):  # busy, or a quota: nothing broke
        logger.error("%s %s failed: %r", request.method, request.url.path, exc)
    return error_response(status, error_code(type(exc)), str(exc), headers=headers)


def _describe(error: Mapping[str, Any]) -> str:
    """`{"loc": ("body", "compression", "ratio"), "msg": ...}` -> `compression.ratio: ...`."""
    loc: Sequence[Any] = error.get("loc", ())
    field = ".".join(str(part) for part in loc[1:]) or ".".join(str(part) for part in loc)
    msg = str(error.get("msg", "invalid"))
    if error.get("type") == "json_invalid":
        reason = error.get("ctx", {}).get("error", msg)
        return f"request body is not valid JSON: {reason} (at character {field})"
    return msg if not field or msg.startswith(field) else f"{field}: {msg}"


_ECHO_CHARS = 256
"""Longest string echoed back in a 422's `detail` (the input of a 16 MiB field is not)."""
_ECHO_ITEMS = 16
"""Most items of a list or object echoed back in a 422's `detail`."""


def _plain(value: Any, depth: int = 0) -> Any:
    """`value` as JSON that always serialises: non-finite floats (`1e400`, NaN) and unknown
    objects become strings; long strings and containers are cut short."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return utf8_safe(value if len(value) <= _ECHO_CHARS else value[:_ECHO_CHARS] + "...")
    if depth >= 8:
        return "..."
    if isinstance(value, Mapping):
        items = list(value.items())[:_ECHO_ITEMS]
        return {_plain(str(key), depth + 1): _plain(item, depth + 1) for key, item in items}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item, depth + 1) for item in list(value)[:_ECHO_ITEMS]]
    return _plain(str(value), depth + 1)


def _detail(error: Mapping[str, Any]) -> dict[str, Any]:
    """One pydantic error made plain for the 422 body (`loc` too: a client's field names)."""
    loc = [part if isinstance(part, int) else _plain(str(part)) for part in error.get("loc", ())]
    return {key: loc if key == "loc" else _plain(value) for key, value in error.items()}


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    shown = [_detail(error) for error in errors[:_ECHO_ITEMS]]
    message = "; ".join(_describe(error) for error in shown) or "invalid request"
    if len(errors) > len(shown):
        message += f"; and {len(errors) - len(shown)} more errors"
    if any(error.get("type") == UNSUPPORTED_PARAMETER for error in errors):
        return error_response(400, UNSUPPORTED_PARAMETER, message, detail=shown)
    return error_response(422, "invalid_request", message, detail=shown)


def _allowed_methods(request: Request) -> str:
    """The methods the OpenAPI document declares at this path (Starlette's 405 names only
    the first route's)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            methods |= {method.upper() for method in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    code = _HTTP_CODES.get(exc.status_code, phrase)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return error_response(exc.status_code, code, str(exc.detail), headers=headers or None)


async def handle_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers: every ServiceError, 422s, HTTP errors, and the rest (500)."""
    service_errors: list[type[ServiceError]] = [ServiceError, *ERROR_STATUS]
    for error_type in service_errors:
        app.add_exception_handler(error_type, handle_service_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(Exception, handle_unexpected_error)
