"""`AsyncClient`: the asyncio client. It drives the plans of `kvzip.client.plans` with httpx,
awaiting where `Client` blocks; its surface is `Client`'s."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
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

__all__ = ["AsyncClient", "AsyncTextStream"]

T = TypeVar("T")
R = TypeVar("R")


class AsyncTextStream(Generic[R]):
    """A streamed answer: `async for` gives the text deltas; then `result` is the final
    Answer or ChatCompletion. Closing it (`aclose`, or leaving its `async with` block)
    early stops the generation on the server."""

    def __init__(self, response: httpx.Response, decoder: StreamDecoder[R]) -> None:
        self.response = response
        self._decoder = decoder
        self._deltas = self._read()

    async def _read(self) -> AsyncGenerator[str, None]:
        try:
            async for line in self.response.aiter_lines():
                if delta := self._decoder.feed(line):
                    yield delta
                if self._decoder.done:
                    return
            self._decoder.end()
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._decoder.text

    @property
    def result(self) -> R:
        """The final result; RuntimeError before the stream has been read to its end."""
        return self._decoder.result()

    async def aclose(self) -> None:
        await self._deltas.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncTextStream[R]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient:
    """The KVzip service over HTTP, for asyncio (and trio): `Client`'s methods, awaited,
    and `async with`. `transport` may be `httpx.ASGITransport(app)` to call an app in-process.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        options = http_options(base_url, api_key, timeout, headers)
        self._http = httpx.AsyncClient(**options, transport=transport)
        self._calls = Calls(RetryPolicy(max_retries=max_retries))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _perform(self, step: Send | Sleep) -> httpx.Response | None:
        if isinstance(step, Sleep):
            await anyio.sleep(step.seconds)
            return None
        request = self._http.build_request(
            step.method, step.path, params=step.params, json=step.json
        )
        try:
            response = await self._http.send(request, stream=step.stream)
            if not (step.stream and response.is_success):
                await response.aread()
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        return response

    async def _run(self, plan: Plan[T]) -> T:
        reply: Any = None
        try:
            while True:
                reply = await self._perform(plan.send(reply))
        except StopIteration as done:
            result: T = done.value
            return result
        finally:
            plan.close()

    # --- contexts ----------------------------------------------------------------------------

    async def create_context(self, text: str, **options: Unpack[CreateOptions]) -> Context:
        """Register a document (`wait=False`: at once, state PROCESSING; see wait_until_ready).
        Registering the same document again returns the same context."""
        return await self._run(self._calls.create_context(text, options))

    async def get_context(self, context_id: str) -> Context:
        return await self._run(self._calls.get_context(context_id))

    async def list_contexts(
        self, page_size: int = 50, page_token: str | None = None
    ) -> ContextPage:
        """One page of the caller's contexts, oldest first."""
        return await self._run(self._calls.list_contexts(page_size, page_token))

    async def iter_contexts(self, page_size: int = 100) -> AsyncIterator[Context]:
        """Every context of the caller, page after page (`async for`)."""
        token: str | None = None
        while True:
            page = await self.list_contexts(page_size, token)
            for context in page.contexts:
                yield context
            if not (token := page.next_page_token):
                return

    async def update_context(
        self,
        context_id: str,
        *,
        ttl_seconds: float | None = None,
        expire_time: datetime | str | None = None,
    ) -> Context:
        """A new expiry: exactly one of `ttl_seconds` (from now) or `expire_time`."""
        return await self._run(self._calls.update_context(context_id, ttl_seconds, expire_time))

    async def delete_context(self, context_id: str) -> None:
        await self._run(self._calls.delete_context(context_id))

    async def wait_until_ready(
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
        return await self._run(plan)

    # --- questions ---------------------------------------------------------------------------

    async def query(
        self, context_id: str, question: str, **options: Unpack[QueryOptions]
    ) -> Answer:
        return await self._run(self._calls.query(context_id, question, options))

    async def stream_query(
        self, context_id: str, question: str, **options: Unpack[QueryOptions]
    ) -> AsyncTextStream[Answer]:
        """The answer as it is generated: errors before the first token raise here."""
        response = await self._run(self._calls.open_query_stream(context_id, question, options))
        return AsyncTextStream(response, AnswerDecoder(response.headers.get("x-request-id")))

    async def chat(
        self,
        context_id: str,
        messages: Sequence[Mapping[str, Any]],
        **options: Unpack[ChatOptions],
    ) -> ChatCompletion:
        """`POST /v1/chat/completions` over a context (OpenAI's messages and fields)."""
        return await self._run(self._calls.chat(context_id, messages, options))

    async def stream_chat(
        self,
        context_id: str,
        messages: Sequence[Mapping[str, Any]],
        **options: Unpack[ChatOptions],
    ) -> AsyncTextStream[ChatCompletion]:
        response = await self._run(self._calls.open_chat_stream(context_id, messages, options))
        return AsyncTextStream(response, ChatDecoder(response.headers.get("x-request-id")))

    async def list_models(self) -> list[Model]:
        return await self._run(self._calls.list_models())

    # --- operations --------------------------------------------------------------------------

    async def health(self) -> str:
        """`GET /healthz`: "ok" while the server answers."""
        return await self._run(self._calls.health())

    async def ready(self) -> bool:
        """`GET /readyz`: whether the server can take work now."""
        return await self._run(self._calls.ready())

    async def metrics(self) -> str:
        """`GET /metrics`: the Prometheus text."""
        return await self._run(self._calls.metrics())
