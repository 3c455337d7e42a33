"""Server-Sent Events: the wire format and a response that stops work when the client leaves.

Each event is one `data: <json>` line and a blank line; a stream ends with `data: [DONE]`
(the OpenAI convention), or with an error event when it fails after it has started.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.errors import error_code, status_of
from app.schemas import ErrorBody, ErrorPublic
from service.errors import ServiceError

__all__ = ["DONE", "EVENT_SCHEMA", "EventStreamResponse", "aclose", "error_event", "event"]

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "id": {"type": "string"},
        "data": {
            "type": "string",
            "description": "JSON: a text chunk, the final answer with usage, or an error; "
            "then `[DONE]`.",
        },
    },
    "description": "One Server-Sent Event (`data: <json>` and a blank line).",
}
"""The OpenAPI schema of one event of a `text/event-stream` response."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: BaseModel) -> bytes:
    """One `data:` event holding `payload` as compact JSON (fields that are None left out)."""
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n".encode()


def error_event(exc: Exception) -> bytes:
    """The error envelope of `exc` as an event (a stream that fails after its 200)."""
    if isinstance(exc, ServiceError):
        body = ErrorBody(code=error_code(type(exc)), message=str(exc))
        if status_of(exc) >= 500:
            logger.error("stream failed: %r", exc)
    else:
        logger.error("stream failed", exc_info=exc)
        body = ErrorBody(code="internal", message="internal server error")
    return event(ErrorPublic(error=body))


async def aclose(iterator: object) -> None:
    """Close an async generator (runs its `finally`); other iterators are left alone."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` that watches for the client going away, whatever the server.

    When the client disconnects the sending task is cancelled and the body iterator is
    closed at once (not when the garbage collector gets to it), so the generation behind it
    stops at its next token.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], status_code: int = 200) -> None:
        super().__init__(content, status_code=status_code, headers=SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the peer closed the socket
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await aclose(self.body_iterator)
