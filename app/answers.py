"""Answers, shared by `/contexts/{id}/query` and `/v1/chat/completions`.

`start_answer` (streamed) awaits the first event before any byte is sent, so everything
that fails before the first token (404, 409, 400, a full queue's 503) is an HTTP status,
not an error inside a 200 stream; the events that follow are timed for the metrics.

`whole_answer` (not streamed) watches the connection while the answer is generated: when
the client goes away first, the answer is cancelled, which stops its generation at the
next token (in distributed mode, the worker's too), instead of decoding for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request

from app import metrics
from app.sse import aclose
from service.facade import ContextService
from service.types import QueryEvent, QueryRequest, QueryResult

__all__ = ["CLIENT_GONE", "start_answer", "whole_answer"]

CLIENT_GONE = 499
"""The status logged for a request whose client left before its answer (nobody reads it)."""


async def whole_answer(
    http: Request, service: ContextService, context_id: str, request: QueryRequest
) -> QueryResult | None:
    """The answer, timed for the metrics; None when the client went away first (then the
    generation has been stopped)."""
    work = asyncio.ensure_future(service.query(context_id, request))
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # the client left (or this request was cancelled)
            with contextlib.suppress(asyncio.CancelledError):
                await work  # its generation stops before this returns
    if work.cancelled():
        return None
    result = work.result()
    metrics.observe_answer(result)
    return result


async def _disconnected(http: Request) -> None:
    """Return once the client has closed the connection (the body is already read)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def start_answer(
    service: ContextService, context_id: str, request: QueryRequest
) -> AsyncIterator[QueryEvent]:
    """The answer's events; the first one is already there when this returns."""
    events = metrics.observe_stream(service.stream_query(context_id, request))
    try:
        first = await anext(events)
    except BaseException:
        await aclose(events)
        raise
    return _prepend(first, events)


async def _prepend(first: QueryEvent, rest: AsyncIterator[QueryEvent]) -> AsyncIterator[QueryEvent]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await aclose(rest)
