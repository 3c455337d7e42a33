"""Server-Sent Events of the two streamed routes, read line by line (no I/O here).

The native query stream is `{"delta": ...}` events, then the whole answer with usage and
timings, then `[DONE]`; the OpenAI stream is `chat.completion.chunk`s (a role chunk, content
chunks, a chunk with `finish_reason`, a usage chunk), then `[DONE]`. Either may end with one
`{"error": ...}` event instead, which is raised. A decoder turns each line into the text it
adds and keeps what the final result needs.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

from kvzip.client.errors import APIConnectionError, APIError, error_from_event
from kvzip.client.types import (
    Answer,
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    Json,
    Usage,
)

__all__ = ["AnswerDecoder", "ChatDecoder", "StreamDecoder"]

R = TypeVar("R")


class StreamDecoder(ABC, Generic[R]):
    """The state of one stream: the text so far, whether `[DONE]` came, the final result."""

    def __init__(self, request_id: str | None = None) -> None:
        self.request_id = request_id
        self.done = False
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    def feed(self, line: str) -> str:
        """The text one line adds ("" for none); raises the error event that ends a stream."""
        if not line.startswith("data:"):
            return ""
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            self.done = True
            return ""
        try:
            payload: Any = json.loads(data)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise APIError(f"not a JSON object event: {data[:80]!r}", code="invalid_event")
        if isinstance(payload.get("error"), dict):
            raise error_from_event(payload["error"], self.request_id)
        delta = self._read(payload)
        self._parts.append(delta)
        return delta

    def end(self) -> None:
        """The body ended: an error unless `[DONE]` came."""
        if not self.done:
            raise APIConnectionError("the stream ended before [DONE]", code="incomplete_stream")

    def result(self) -> R:
        """The final result, once the stream is done."""
        if not self.done:
            raise RuntimeError("the stream is not finished: iterate it to its end first")
        found = self._result()
        if found is None:
            raise APIError("the stream ended without its final event", code="invalid_event")
        return found

    @abstractmethod
    def _read(self, payload: Json) -> str:
        """Keep what `payload` carries; return its text."""

    @abstractmethod
    def _result(self) -> R | None:
        """The result, or None when the stream did not carry it."""


class AnswerDecoder(StreamDecoder[Answer]):
    """`POST /contexts/{id}/query` with `"stream": true`."""

    def __init__(self, request_id: str | None = None) -> None:
        super().__init__(request_id)
        self._answer: Answer | None = None

    def _read(self, payload: Json) -> str:
        if "answer" in payload:
            self._answer = Answer.from_json(payload)
            return ""
        return str(payload.get("delta") or "")

    def _result(self) -> Answer | None:
        return self._answer


class ChatDecoder(StreamDecoder[ChatCompletion]):
    """`POST /v1/chat/completions` with `"stream": true` (and usage asked for)."""

    def __init__(self, request_id: str | None = None) -> None:
        super().__init__(request_id)
        self._head: Json = {}
        self._finish_reason: str | None = None
        self._usage: Usage | None = None

    def _read(self, payload: Json) -> str:
        self._head = self._head or payload
        if payload.get("usage"):
            self._usage = Usage.from_json(payload["usage"])
        text = ""
        for choice in payload.get("choices") or ():
            text += (choice.get("delta") or {}).get("content") or ""
            self._finish_reason = choice.get("finish_reason") or self._finish_reason
        return text

    def _result(self) -> ChatCompletion | None:
        if self._usage is None or self._finish_reason is None or not self._head:
            return None
        return ChatCompletion(
            id=self._head["id"],
            created=int(self._head["created"]),
            model=self._head["model"],
            choices=[ChatChoice(ChatMessage("assistant", self.text), self._finish_reason)],
            usage=self._usage,
        )
