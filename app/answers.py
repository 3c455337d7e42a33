"""Answers as event streams, shared by `/contexts/{id}/query` and `/v1/chat/completions`.

`start_answer` awaits the first event before any byte is sent, so everything that fails
before the first token (404, 409, 400, a full queue's 503) is an HTTP status, not an error
inside a 200 stream; the events that follow are timed for the metrics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from app import metrics
from app.sse import aclose
from service.facade import ContextService
from service.types import QueryEvent, QueryRequest

__all__ = ["start_answer"]


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
