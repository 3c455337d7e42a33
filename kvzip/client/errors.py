"""The exceptions of the client: the server's error envelope, and failures to reach it.

    KVzipError                     every failure; status, code, message, request_id, retry_after
    ├── APIConnectionError         the server could not be reached, or the connection broke
    │   └── APITimeoutError        no answer within the client's timeout
    ├── APIError                   the server refused: `{"error": {"code", "message"}}`
    │   ├── InvalidRequestError    400 (invalid input), 422 (malformed or out-of-range field)
    │   ├── UnauthorizedError      401: no API key, or an unknown one
    │   ├── NotFoundError          404: no such context for this caller, or no such model
    │   ├── ConflictError          409: the context is PROCESSING or FAILED, or incompatible
    │   ├── RequestTooLargeError   413: body or document over the limit
    │   ├── RateLimitedError       429: over the key's rate; see `retry_after`
    │   └── ServerError            5xx
    │       └── OverloadedError    503: the work queue is full (`retry_after`), or no engine
    ├── ContextFailedError         wait_until_ready: the ingest ended FAILED (`context`)
    └── WaitTimeoutError           wait_until_ready: still PROCESSING at the deadline

An error that ends a stream after its 200 carries no status (`status` is None); its class is
chosen by its code.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from kvzip.client.types import Context, Json

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "ConflictError",
    "ContextFailedError",
    "InvalidRequestError",
    "KVzipError",
    "NotFoundError",
    "OverloadedError",
    "RateLimitedError",
    "RequestTooLargeError",
    "ServerError",
    "UnauthorizedError",
    "WaitTimeoutError",
    "connection_error",
    "error_from_event",
    "error_from_response",
]


class KVzipError(Exception):
    """Every failure of the client. `status` is the HTTP status (None when there is none);
    `code` the server's snake_case code; `retry_after` the seconds of `Retry-After`."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        request_id: str | None = None,
        retry_after: float | None = None,
        detail: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after
        self.detail = detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, {self.message!r})"


class APIConnectionError(KVzipError):
    """The server could not be reached, or the connection broke mid-answer."""


class APITimeoutError(APIConnectionError):
    """The server did not answer within the client's timeout."""


class APIError(KVzipError):
    """The server answered with an error envelope."""


class InvalidRequestError(APIError):
    """400 `invalid_input` or 422 `invalid_request` (the message names the field)."""


class UnauthorizedError(APIError):
    """401: the server has API keys and the request had none, or an unknown one."""


class NotFoundError(APIError):
    """404: unknown, expired, deleted or another tenant's context; an unserved model."""


class ConflictError(APIError):
    """409: the context is PROCESSING or FAILED, or was made by another model."""


class RequestTooLargeError(APIError):
    """413: the body or the document is over the server's limit."""


class RateLimitedError(APIError):
    """429: over this key's request rate; retry after `retry_after` seconds."""


class ServerError(APIError):
    """A 5xx answer."""


class OverloadedError(ServerError):
    """503: the work queue is full (retry after `retry_after`), or no engine is running."""


class ContextFailedError(KVzipError):
    """The context's ingest failed; `context` is its record (with `error`)."""

    def __init__(self, context: Context) -> None:
        super().__init__(f"ingest of {context.id} failed: {context.error}", code="context_failed")
        self.context = context


class WaitTimeoutError(KVzipError, TimeoutError):
    """The context was still PROCESSING when the wait's deadline passed."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequestError,
    401: UnauthorizedError,
    404: NotFoundError,
    409: ConflictError,
    413: RequestTooLargeError,
    422: InvalidRequestError,
    429: RateLimitedError,
    503: OverloadedError,
}
_BY_CODE: dict[str, type[APIError]] = {
    "invalid_input": InvalidRequestError,
    "context_not_found": NotFoundError,
    "context_not_ready": ConflictError,
    "incompatible_context": ConflictError,
    "document_too_long": RequestTooLargeError,
    "queue_full": OverloadedError,
    "engine_unavailable": OverloadedError,
    "internal": ServerError,
}
"""The class of an error event in a stream (its status was already 200)."""


def _error_class(status: int) -> type[APIError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else APIError


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header: delay-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _envelope(response: httpx.Response) -> Json | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) and "message" in error else None


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error response (its body read); bodies that are not the
    envelope (a proxy's page) keep their text as the message."""
    status = response.status_code
    error = _envelope(response)
    if error is None:
        phrase = _phrase(status)
        code = phrase.lower().replace(" ", "_").replace("-", "_") or "error"
        error = {"code": code, "message": response.text.strip() or phrase or str(status)}
    return _error_class(status)(
        str(error["message"]),
        status=status,
        code=str(error.get("code", "error")),
        request_id=response.headers.get("x-request-id"),
        retry_after=_retry_after(response.headers.get("retry-after")),
        detail=error.get("detail"),
    )


def error_from_event(error: Json, request_id: str | None) -> APIError:
    """The exception for a `{"error": ...}` event that ended a stream after its 200."""
    code = str(error.get("code", "error"))
    return _BY_CODE.get(code, APIError)(
        str(error.get("message", "the stream failed")), code=code, request_id=request_id
    )


def connection_error(exc: httpx.TransportError) -> APIConnectionError:
    """httpx's transport failure as this client's exception."""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"timed out: {exc}", code="timeout")
    return APIConnectionError(f"cannot reach the server: {exc}", code="connection_error")
