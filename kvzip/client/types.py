"""The results: frozen dataclasses mirroring the response JSON (docs/api.md), field for field.

Each has `from_json`, which reads the fields it knows and ignores the rest, so a newer
server that adds fields does not break an older client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = [
    "Answer",
    "ChatChoice",
    "ChatCompletion",
    "ChatMessage",
    "Compression",
    "Context",
    "ContextPage",
    "ContextUsage",
    "Json",
    "Model",
    "PromptTokensDetails",
    "Timings",
    "Usage",
]

Json = Mapping[str, Any]
"""A decoded JSON object."""


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass(frozen=True)
class ContextUsage:
    context_tokens: int

    @classmethod
    def from_json(cls, data: Json) -> ContextUsage:
        return cls(context_tokens=int(data["context_tokens"]))


@dataclass(frozen=True)
class Compression:
    """How a context was compressed, and what it takes stored."""

    method: str
    ratio: float
    kept_kv_pairs: int
    total_kv_pairs: int
    kept_fraction: float
    bytes: int
    quantization: str = "none"
    bytes_full_bf16: int = 0

    @classmethod
    def from_json(cls, data: Json) -> Compression:
        return cls(
            method=data["method"],
            ratio=float(data["ratio"]),
            kept_kv_pairs=int(data["kept_kv_pairs"]),
            total_kv_pairs=int(data["total_kv_pairs"]),
            kept_fraction=float(data["kept_fraction"]),
            bytes=int(data["bytes"]),
            quantization=data.get("quantization", "none"),
            bytes_full_bf16=int(data.get("bytes_full_bf16", 0)),
        )


@dataclass(frozen=True)
class Context:
    """A registered context (`GET /contexts/{id}`)."""

    id: str
    name: str
    display_name: str | None
    model: str
    state: str
    """PROCESSING, READY or FAILED."""
    create_time: datetime
    expire_time: datetime | None
    progress: float
    error: str | None
    usage: ContextUsage
    compression: Compression

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    @classmethod
    def from_json(cls, data: Json) -> Context:
        create_time = _time(data["create_time"])
        assert create_time is not None
        return cls(
            id=data["id"],
            name=data.get("name", f"contexts/{data['id']}"),
            display_name=data.get("display_name"),
            model=data["model"],
            state=data["state"],
            create_time=create_time,
            expire_time=_time(data.get("expire_time")),
            progress=float(data.get("progress", 1.0)),
            error=data.get("error"),
            usage=ContextUsage.from_json(data["usage"]),
            compression=Compression.from_json(data["compression"]),
        )


@dataclass(frozen=True)
class ContextPage:
    """One page of `GET /contexts`; `next_page_token` is None on the last."""

    contexts: list[Context]
    next_page_token: str | None = None

    @classmethod
    def from_json(cls, data: Json) -> ContextPage:
        return cls(
            contexts=[Context.from_json(item) for item in data["contexts"]],
            next_page_token=data.get("next_page_token") or None,
        )


@dataclass(frozen=True)
class PromptTokensDetails:
    cached_tokens: int
    """Prompt tokens served from the compressed cache (system prefix + document)."""


@dataclass(frozen=True)
class Usage:
    """Tokens of one answer, as OpenAI reports them (both query routes)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def from_json(cls, data: Json) -> Usage:
        details = data.get("prompt_tokens_details") or {}
        return cls(
            prompt_tokens=int(data["prompt_tokens"]),
            completion_tokens=int(data["completion_tokens"]),
            total_tokens=int(data["total_tokens"]),
            prompt_tokens_details=PromptTokensDetails(int(details.get("cached_tokens", 0))),
        )


@dataclass(frozen=True)
class Timings:
    load_s: float
    ttft_s: float
    decode_s: float

    @classmethod
    def from_json(cls, data: Json) -> Timings:
        return cls(
            load_s=float(data["load_s"]),
            ttft_s=float(data["ttft_s"]),
            decode_s=float(data["decode_s"]),
        )


@dataclass(frozen=True)
class Answer:
    """The answer to a question (`POST /contexts/{id}/query`, or a stream's last event)."""

    answer: str
    usage: Usage
    timings: Timings
    finish_reason: str
    """"stop" (end of sequence or a stop sequence) or "length"."""

    @classmethod
    def from_json(cls, data: Json) -> Answer:
        return cls(
            answer=data["answer"],
            usage=Usage.from_json(data["usage"]),
            timings=Timings.from_json(data["timings"]),
            finish_reason=data["finish_reason"],
        )


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatChoice:
    message: ChatMessage
    finish_reason: str
    index: int = 0


@dataclass(frozen=True)
class ChatCompletion:
    """An OpenAI `chat.completion` (`POST /v1/chat/completions`), streamed or not."""

    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"

    @property
    def text(self) -> str:
        """The first choice's content (the service answers with one)."""
        return self.choices[0].message.content

    @classmethod
    def from_json(cls, data: Json) -> ChatCompletion:
        choices = [
            ChatChoice(
                message=ChatMessage(
                    role=item["message"].get("role", "assistant"),
                    content=item["message"].get("content") or "",
                ),
                finish_reason=item["finish_reason"],
                index=int(item.get("index", 0)),
            )
            for item in data["choices"]
        ]
        return cls(
            id=data["id"],
            created=int(data["created"]),
            model=data["model"],
            choices=choices,
            usage=Usage.from_json(data["usage"]),
            object=data.get("object", "chat.completion"),
        )


@dataclass(frozen=True)
class Model:
    """The served model (`GET /v1/models`)."""

    id: str
    created: int
    owned_by: str = "kvzip"
    object: str = "model"

    @classmethod
    def from_json(cls, data: Json) -> Model:
        return cls(
            id=data["id"],
            created=int(data["created"]),
            owned_by=data.get("owned_by", "kvzip"),
            object=data.get("object", "model"),
        )
