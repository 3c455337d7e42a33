"""`Client`: the blocking client. It drives the plans of `kvzip.client.plans` with httpx."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, TypeVar

import httpx
from typing_extensions import Unpack

from kvzip.client.errors import connection_error
from kvzip.client.events import AnswerDecoder, ChatDecoder, StreamDecoder
from kvzip.client.plans import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    Calls,
    ChatOptions,
    CreateOptions,
    Plan,
    QueryOptions,
    RetryPolicy,
    Send,
    Sleep,
    http_options,
)
from kvzip.client.types import Answer, ChatCompletion, Context, ContextPage, Model

__all__ = ["Client", "TextStream"]

T = TypeVar("T")
R = TypeVar("R")


class TextStream(Generic[R]):
    """A streamed answer: iterate it for the text deltas; then `result` is the final
    Answer (usage, timings, finish_reason) or ChatCompletion. Closing it (or leaving its
    `with` block) early stops the generation on the server."""

    def __init__(self, response: httpx.Response, decoder: StreamDecoder[R]) -> None:
        self.response = response
        self._decoder = decoder
        self._deltas = self._read()

    def _read(self) -> Generator[str, None, None]:
        try:
            for line in self.response.iter_lines():
                if delta := self._decoder.feed(line):
                    yield delta
                if self._decoder.done:
                    return
            self._decoder.end()
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        finally:
            self.response.close()

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._decoder.text

    @property
    def result(self) -> R:
        """The final result; RuntimeError before the stream has been read to its end."""
        return self._decoder.result()

    def close(self) -> None:
        self._deltas.close()
        self.response.close()

    def __enter__(self) -> TextStream[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """The KVzip service over HTTP, blocking.

    `api_key` is sent as `Authorization: Bearer <key>`; `max_retries` retries a 429 or 503
    after its `Retry-After` (off by default); `transport` replaces httpx's (tests).
    Every failure raises a `KVzipError` (kvzip.client.errors).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        options = http_options(base_url, api_key, timeout, headers)
        self._http = httpx.Client(**options, transport=transport)
        self._calls = Calls(RetryPolicy(max_retries=max_retries))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _perform(self, step: Send | Sleep) -> httpx.Response | None:
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        request = self._http.build_request(
            step.method, step.path, params=step.params, json=step.json
        )
        try:
            response = self._http.send(request, stream=step.stream)
            if not (step.stream and response.is_success):
                response.read()
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        return response

    def _run(self, plan: Plan[T]) -> T:
        reply: Any = None
        try:
            while True:
                reply = self._perform(plan.send(reply))
        except StopIteration as done:
            result: T = done.value
            return result
        finally:
            plan.close()

    # --- contexts ----------------------------------------------------------------------------

    def create_context(self, text: str, **options: Unpack[CreateOptions]) -> Context:
        """Register a document (`wait=False`: at once, state PROCESSING; see wait_until_ready).
        Registering the same document again returns the same context."""
        return self._run(self._calls.create_context(text, options))

    def get_context(self, context_id: str) -> Context:
        return self._run(self._calls.get_context(context_id))

    def list_contexts(self, page_size: int = 50, page_token: str | None = None) -> ContextPage:
        """One page of the caller's contexts, oldest first."""
        return self._run(self._calls.list_contexts(page_size, page_token))

    def iter_contexts(self, page_size: int = 100) -> Iterator[Context]:
        """Every context of the caller, page after page."""
        token: str | None = None
        while True:
            page = self.list_contexts(page_size, token)
            yield from page.contexts
            if not (token := page.next_page_token):
                return

    def update_context(
        self,
        context_id: str,
        *,
        ttl_seconds: float | None = None,
        expire_time: datetime | str | None = None,
    ) -> Context:
        """A new expiry: exactly one of `ttl_seconds` (from now) or `expire_time`."""
        return self._run(self._calls.update_context(context_id, ttl_seconds, expire_time))

    def delete_context(self, context_id: str) -> None:
        self._run(self._calls.delete_context(context_id))

    def wait_until_ready(
        self,
        context: str | Context,
        *,
        timeout: float | None = 600.0,
        poll_interval: float = 0.5,
        on_progress: Callable[[Context], object] | None = None,
    ) -> Context:
        """Poll until READY (returned); FAILED raises ContextFailedError, still PROCESSING
        after `timeout` seconds WaitTimeoutError. `on_progress` sees every poll's context."""
        plan = self._calls.wait_until_ready(context, timeout, poll_interval, on_progress)
        return self._run(plan)

    # --- questions ---------------------------------------------------------------------------

    def query(self, context_id: str, question: str, **options: Unpack[QueryOptions]) -> Answer:
        return self._run(self._calls.query(context_id, question, options))

    def stream_query(
        self, context_id: str, question: str, **options: Unpack[QueryOptions]
    ) -> TextStream[Answer]:
        """The answer as it is generated: errors before the first token raise here."""
        response = self._run(self._calls.open_query_stream(context_id, question, options))
        return TextStream(response, AnswerDecoder(response.headers.get("x-request-id")))

    def chat(
        self,
        context_id: str,
        messages: Sequence[Mapping[str, Any]],
        **options: Unpack[ChatOptions],
    ) -> ChatCompletion:
        """`POST /v1/chat/completions` over a context (OpenAI's messages and fields)."""
        return self._run(self._calls.chat(context_id, messages, options))

    def stream_chat(
        self,
        context_id: str,
        messages: Sequence[Mapping[str, Any]],
        **options: Unpack[ChatOptions],
    ) -> TextStream[ChatCompletion]:
        response = self._run(self._calls.open_chat_stream(context_id, messages, options))
        return TextStream(response, ChatDecoder(response.headers.get("x-request-id")))

    def list_models(self) -> list[Model]:
        return self._run(self._calls.list_models())

    # --- operations --------------------------------------------------------------------------

    def health(self) -> str:
        """`GET /healthz`: "ok" while the server answers."""
        return self._run(self._calls.health())

    def ready(self) -> bool:
        """`GET /readyz`: whether the server can take work now."""
        return self._run(self._calls.ready())

    def metrics(self) -> str:
        """`GET /metrics`: the Prometheus text."""
        return self._run(self._calls.metrics())
