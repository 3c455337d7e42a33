"""What every call sends and how its answer is read, with no I/O: one place for both clients.

A call is a *plan*, a generator that yields `Send` (answered with the `httpx.Response`) and
`Sleep` (answered with None) and returns the typed result. `Client` and `AsyncClient` drive
the same plans, the one with blocking calls and the other with awaits, so request building,
retries, polling, response parsing and error mapping exist once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict, TypeVar
from urllib.parse import quote

import httpx

from kvzip.client.errors import (
    APIError,
    ContextFailedError,
    OverloadedError,
    RateLimitedError,
    WaitTimeoutError,
    error_from_response,
)
from kvzip.client.types import Answer, ChatCompletion, Context, ContextPage, Json, Model

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "Calls",
    "ChatOptions",
    "CompressionSpec",
    "CreateOptions",
    "Plan",
    "QueryOptions",
    "RetryPolicy",
    "Send",
    "Sleep",
    "http_options",
]

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=600.0)
"""Connecting and writing: 30 s; reading: 10 min (a `wait: true` ingest answers when done)."""


@dataclass(frozen=True)
class Send:
    """One HTTP request. The driver answers with its response, the body read unless this is
    a stream that succeeded (then the caller reads and closes it)."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    stream: bool = False


@dataclass(frozen=True)
class Sleep:
    seconds: float


Plan = Generator[Send | Sleep, Any, T]
"""A call: yields Send / Sleep, returns its result (see the module docstring)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a 429 or 503 (refused before any work was done, so every route may
    retry): after `Retry-After` when the server sends one, else `backoff * 2**attempt`
    seconds; never a wait over `max_wait` (the error is raised instead)."""

    max_retries: int = 0
    max_wait: float = 60.0
    backoff: float = 0.5

    def delay(self, error: APIError, attempt: int) -> float | None:
        """Seconds to wait before retrying after `error`, or None to raise it."""
        if attempt >= self.max_retries or not isinstance(error, RateLimitedError | OverloadedError):
            return None
        wait = error.retry_after if error.retry_after is not None else self.backoff * 2**attempt
        return wait if wait <= self.max_wait else None


def http_options(
    base_url: str,
    api_key: str | None,
    timeout: float | httpx.Timeout | None,
    headers: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The httpx client's settings: the server, `Authorization: Bearer <key>`, the timeout."""
    merged = {"User-Agent": "kvzip-python-client", **(headers or {})}
    if api_key:
        merged["Authorization"] = f"Bearer {api_key}"
    return {"base_url": base_url, "headers": merged, "timeout": timeout}


class CompressionSpec(TypedDict, total=False):
    """`compression` of a new context; what is left out takes the server's default."""

    method: str
    ratio: float
    threshold: float
    quantization: str
    group_size: int


class CreateOptions(TypedDict, total=False):
    display_name: str | None
    compression: CompressionSpec | None
    system: str | None
    ttl_seconds: float | None
    wait: bool


class QueryOptions(TypedDict, total=False):
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: Sequence[str] | None
    ratio: float | None


class ChatOptions(TypedDict, total=False):
    model: str | None
    """The served model; when left out, the first of `GET /v1/models` (asked once)."""
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: str | Sequence[str] | None


def _given(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that were given (None means "the server's default")."""
    return {name: value for name, value in options.items() if value is not None}


def _context_path(context_id: str) -> str:
    return f"/contexts/{quote(context_id, safe='')}"


def send(request: Send, retry: RetryPolicy) -> Plan[httpx.Response]:
    """`request`, retried as `retry` allows; its 2xx response, else the error raised."""
    attempt = 0
    while True:
        response: httpx.Response = yield request
        if response.is_success:
            return response
        error = error_from_response(response)
        delay = retry.delay(error, attempt)
        if delay is None:
            raise error
        yield Sleep(delay)
        attempt += 1


class Calls:
    """Every route of the API as a plan."""

    def __init__(self, retry: RetryPolicy) -> None:
        self.retry = retry
        self._model: str | None = None

    def _json(self, request: Send, parse: Callable[[Json], T]) -> Plan[T]:
        response = yield from send(request, self.retry)
        return parse(response.json())

    # --- contexts ----------------------------------------------------------------------------

    def create_context(self, text: str, options: CreateOptions) -> Plan[Context]:
        body = {"text": text, **_given(options)}
        return self._json(Send("POST", "/contexts", json=body), Context.from_json)

    def get_context(self, context_id: str) -> Plan[Context]:
        return self._json(Send("GET", _context_path(context_id)), Context.from_json)

    def list_contexts(self, page_size: int, page_token: str | None) -> Plan[ContextPage]:
        params = _given({"page_size": page_size, "page_token": page_token})
        return self._json(Send("GET", "/contexts", params=params), ContextPage.from_json)

    def update_context(
        self, context_id: str, ttl_seconds: float | None, expire_time: datetime | str | None
    ) -> Plan[Context]:
        if isinstance(expire_time, datetime):
            expire_time = expire_time.isoformat()
        body = _given({"ttl_seconds": ttl_seconds, "expire_time": expire_time})
        return self._json(Send("PATCH", _context_path(context_id), json=body), Context.from_json)

    def delete_context(self, context_id: str) -> Plan[None]:
        yield from send(Send("DELETE", _context_path(context_id)), self.retry)

    def wait_until_ready(
        self,
        context: str | Context,
        timeout: float | None,
        poll_interval: float,
        on_progress: Callable[[Context], object] | None,
    ) -> Plan[Context]:
        """Poll until the context leaves PROCESSING: READY returns it, FAILED raises
        ContextFailedError, still PROCESSING after `timeout` seconds raises WaitTimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        info = context if isinstance(context, Context) else (yield from self.get_context(context))
        while info.state == "PROCESSING":
            if on_progress is not None:
                on_progress(info)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeoutError(
                    f"{info.id} still PROCESSING ({info.progress:.0%}) after {timeout} s",
                    code="wait_timeout",
                )
            yield Sleep(poll_interval if left is None else min(poll_interval, left))
            info = yield from self.get_context(info.id)
        if on_progress is not None:
            on_progress(info)
        if info.state == "FAILED":
            raise ContextFailedError(info)
        return info

    # --- questions ---------------------------------------------------------------------------

    def _query(self, context_id: str, question: str, options: QueryOptions, stream: bool) -> Send:
        body = {"question": question, **_given(options), "stream": stream}
        return Send("POST", f"{_context_path(context_id)}/query", json=body, stream=stream)

    def query(self, context_id: str, question: str, options: QueryOptions) -> Plan[Answer]:
        return self._json(self._query(context_id, question, options, False), Answer.from_json)

    def open_query_stream(
        self, context_id: str, question: str, options: QueryOptions
    ) -> Plan[httpx.Response]:
        return send(self._query(context_id, question, options, True), self.retry)

    # --- OpenAI-compatible -------------------------------------------------------------------

    def list_models(self) -> Plan[list[Model]]:
        return self._json(
            Send("GET", "/v1/models"), lambda data: [Model.from_json(m) for m in data["data"]]
        )

    def _chat(
        self,
        context_id: str,
        messages: Sequence[Mapping[str, Any]],
        options: ChatOptions,
        stream: bool,
    ) -> Plan[Send]:
        model = options.get("model") or self._model
        if model is None:
            model = self._model = (yield from self.list_models())[0].id
        body = {**_given(options), "model": model, "context_id": context_id}
        body["messages"] = [dict(message) for message in messages]
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return Send("POST", "/v1/chat/completions", json=body, stream=stream)

    def chat(
        self, context_id: str, messages: Sequence[Mapping[str, Any]], options: ChatOptions
    ) -> Plan[ChatCompletion]:
        request = yield from self._chat(context_id, messages, options, False)
        return (yield from self._json(request, ChatCompletion.from_json))

    def open_chat_stream(
        self, context_id: str, messages: Sequence[Mapping[str, Any]], options: ChatOptions
    ) -> Plan[httpx.Response]:
        request = yield from self._chat(context_id, messages, options, True)
        return (yield from send(request, self.retry))

    # --- operations --------------------------------------------------------------------------

    def health(self) -> Plan[str]:
        return self._json(Send("GET", "/healthz"), lambda data: str(data["status"]))

    def ready(self) -> Plan[bool]:
        """True on 200, False on the 503 of a service that cannot take work (never retried)."""
        response: httpx.Response = yield Send("GET", "/readyz")
        if response.is_success or response.status_code == 503:
            return response.is_success
        raise error_from_response(response)

    def metrics(self) -> Plan[str]:
        response = yield from send(Send("GET", "/metrics"), self.retry)
        return response.text
