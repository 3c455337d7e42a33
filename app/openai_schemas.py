"""OpenAI-compatible bodies: `POST /v1/chat/completions` and `GET /v1/models`.

The request takes what OpenAI's chat API defines that this server implements, plus
`context_id`, which OpenAI clients pass through `extra_body`. Nothing is ignored silently: a
field it does not implement (an unknown one, or `n`, `logprobs`, `tools`, penalties... with
anything but their neutral value) is refused as `unsupported_parameter` (400, naming it). The
responses carry the fields the official client reads, with
`usage.prompt_tokens_details.cached_tokens` = the context tokens served from the compressed
cache.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError

from app.schemas import (
    CONTEXT_ID_EXAMPLE,
    CONTEXT_ID_PATTERN,
    UNSUPPORTED_PARAMETER,
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

SYSTEM_ROLES = ("system", "developer")
_NAME_CHARS = 64  # the longest unknown field name echoed back


def unsupported(message: str) -> PydanticCustomError:
    """The validation error that app.errors answers with 400 `unsupported_parameter`."""
    return PydanticCustomError(UNSUPPORTED_PARAMETER, "{message}", {"message": message})


def _short(text: str) -> str:
    return text if len(text) <= _NAME_CHARS else text[:_NAME_CHARS] + "..."


def _json(value: Any) -> str:
    """`value` as the client wrote it (JSON), cut short."""
    return _short(json.dumps(value, default=str))


class OpenAIBody(BaseModel):
    """A request object of the OpenAI route: a field it does not define is unsupported."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [repr(_short(str(key))) for key in data if key not in cls.model_fields]
            if unknown:
                names = ", ".join(unknown)
                plural = "s" if len(unknown) > 1 else ""
                raise unsupported(f"unsupported parameter{plural} {names}: not implemented here")
        return data


class TextPart(OpenAIBody):
    # any string parses (another part type is a 400 naming it); the schema names the one taken
    type: str = Field(default="text", json_schema_extra={"enum": ["text"]})
    text: str

    @model_validator(mode="after")
    def _text_only(self) -> Self:
        if self.type != "text":
            raise unsupported(f"unsupported content part type {_short(self.type)!r}: only 'text'")
        return self


class ChatMessage(OpenAIBody):
    """One message. System (and developer) messages join the question side of the prompt,
    never the cached context; user and assistant messages are the conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        json_schema_extra={"enum": [*SYSTEM_ROLES, "user", "assistant"]}
    )  # tool and function parse, to be refused with a 400 that names them
    content: str | list[TextPart] | None = None

    @model_validator(mode="after")
    def _no_tool_messages(self) -> Self:
        if self.role in ("tool", "function"):
            raise unsupported(f"unsupported role {self.role!r}: tool calls are not implemented")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(OpenAIBody):
    include_usage: bool = False


PositiveJsonInt = Annotated[int, Field(ge=1), BeforeValidator(integral)]
"""A JSON integer >= 1; the bound comes before the validator, so the schema says `minimum`
(after it, on a union, pydantic would write a raw `ge` that JSON Schema ignores)."""

NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (),
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "tools": (),
    "functions": (),
}
"""OpenAI fields this server does not implement, and the values (besides null) that ask for
nothing it lacks; any other value is 400 `unsupported_parameter`."""


def _only(neutral: tuple[Any, ...]) -> str:
    """`only null or 1`: what a field this server does not implement may be."""
    return " or ".join(["only null", *(_json(value) for value in neutral)])


def _unimplemented(name: str, ge: float | None = None, le: float | None = None) -> Any:
    """The Field of an OpenAI field this server does not implement: null by default, and a
    schema `enum` of null and its neutral values, so that clients and fuzzers know what is
    accepted; any other value of the right type is still parsed, then refused with 400."""
    neutral = NEUTRAL[name]
    description = f"Not implemented: {_only(neutral)} (anything else is 400 unsupported_parameter)."
    extra: JsonDict = {"enum": [None, *neutral]}
    return Field(default=None, description=description, json_schema_extra=extra, ge=ge, le=le)


class ChatCompletionCreate(OpenAIBody):
    """A chat completion over a registered context.

    The last message must be a user message: the question. Earlier user and assistant
    messages are the conversation before it and system (or developer) messages the
    instructions, both on the question side of the prompt (never cached), within what the
    model window leaves after the context and `max_tokens` (413 with both counts when not).
    `temperature` defaults to 0 (greedy), unlike OpenAI's 1.
    """

    model_config = ConfigDict(
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
                    "messages": [
                        {"role": "system", "content": "Answer in one word."},
                        {"role": "user", "content": "Who wrote the report?"},
                        {"role": "assistant", "content": "Ada."},
                        {"role": "user", "content": "And when?"},
                    ],
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
    max_tokens: PositiveJsonInt | None = Field(default=None, description="Default 128.")
    max_completion_tokens: PositiveJsonInt | None = Field(
        default=None, description="Alias of max_tokens (wins when both are given)."
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: StopSequence | StopSequences | None = Field(
        default=None, description="One stop string, or a list as on the native query route."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: PositiveJsonInt | None = _unimplemented("n")
    logprobs: bool | None = _unimplemented("logprobs")
    top_logprobs: JsonInt | None = _unimplemented("top_logprobs")
    presence_penalty: float | None = _unimplemented("presence_penalty", ge=-2.0, le=2.0)
    frequency_penalty: float | None = _unimplemented("frequency_penalty", ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = _unimplemented("logit_bias")
    response_format: dict[str, Any] | None = _unimplemented("response_format")
    tools: list[Any] | None = _unimplemented("tools")
    functions: list[Any] | None = _unimplemented("functions")

    @model_validator(mode="after")
    def _neutral_only(self) -> Self:
        refused = [
            f"{name!r} (given {_json(value)}; {_only(neutral)})"
            for name, neutral in NEUTRAL.items()
            if (value := getattr(self, name)) is not None and value not in neutral
        ]
        if refused:
            plural = "s" if len(refused) > 1 else ""
            names = ", ".join(refused)
            raise unsupported(f"unsupported parameter{plural} {names}: not implemented here")
        return self

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
