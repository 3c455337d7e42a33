"""OpenAI-compatible bodies: `POST /v1/chat/completions` and `GET /v1/models`.

The request accepts what OpenAI clients send (unknown fields are ignored, as OpenAI-compatible
servers do) plus `context_id`, which OpenAI clients pass through `extra_body`. The responses
carry the fields the official client reads, with `usage.prompt_tokens_details.cached_tokens`
= the context tokens served from the compressed cache.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.schemas import (
    CONTEXT_ID_EXAMPLE,
    CONTEXT_ID_PATTERN,
    JsonInt,
    PromptTokensDetails,
    Seed,
    StopSequence,
    StopSequences,
    integral,
)
from service.types import QueryResult

__all__ = [
    "ChatCompletionChunk",
    "ChatCompletionCreate",
    "ChatCompletionPublic",
    "ChatUsage",
    "ModelListPublic",
    "ModelPublic",
]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


TokenCount = Annotated[int, Field(ge=1), BeforeValidator(integral)]


class ChatCompletionCreate(BaseModel):
    """A chat completion over a registered context: the last user message is the question.

    System messages are ignored (a context's system instruction is fixed when it is
    registered); `temperature` defaults to 0 (greedy), unlike OpenAI's 1.
    """

    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "model": "SmolLM2-135M-Instruct",
                    "context_id": CONTEXT_ID_EXAMPLE,
                    "messages": [{"role": "user", "content": "What is the pass key?"}],
                    "max_tokens": 16,
                },
                {
                    "model": "SmolLM2-135M-Instruct",
                    "context_id": CONTEXT_ID_EXAMPLE,
                    "messages": [{"role": "user", "content": "Summarise the report."}],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            ]
        },
    )

    model: str = Field(description="The served model (see GET /v1/models).")
    messages: list[ChatMessage] = Field(min_length=1)
    context_id: str = Field(
        pattern=CONTEXT_ID_PATTERN,
        description="The compressed context to answer from (`extra_body` in OpenAI clients).",
        examples=[CONTEXT_ID_EXAMPLE],
    )
    max_tokens: TokenCount | None = Field(default=None, description="Default 128.")
    max_completion_tokens: TokenCount | None = Field(
        default=None, description="Alias of max_tokens (wins when both are given)."
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: StopSequence | StopSequences | None = Field(
        default=None, description="One stop string, or a list as on the native query route."
    )
    n: JsonInt = Field(default=1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def from_result(cls, result: QueryResult) -> ChatUsage:
        return cls(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.total_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens),
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str = Field(examples=["stop"])


class ChatCompletionPublic(BaseModel):
    """An OpenAI `chat.completion` object."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "chatcmpl-7d1f0c2a9b8e4f6a",
                    "object": "chat.completion",
                    "created": 1741964966,
                    "model": "SmolLM2-135M-Instruct",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "48213"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 1660,
                        "completion_tokens": 4,
                        "total_tokens": 1664,
                        "prompt_tokens_details": {"cached_tokens": 1648},
                    },
                }
            ]
        }
    )

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed `chat.completion.chunk`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: ChatUsage | None = None


class ModelPublic(BaseModel):
    id: str = Field(examples=["SmolLM2-135M-Instruct"])
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvzip"


class ModelListPublic(BaseModel):
    """The served model, OpenAI's `list` of `model` objects."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "list",
                    "data": [
                        {
                            "id": "SmolLM2-135M-Instruct",
                            "object": "model",
                            "created": 1741964966,
                            "owned_by": "kvzip",
                        }
                    ],
                }
            ]
        }
    )

    object: Literal["list"] = "list"
    data: list[ModelPublic]
