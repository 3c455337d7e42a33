"""HTTP request/response bodies: `XCreate` comes in, `XPublic` goes out.

Request bodies forbid unknown fields, so a typo (`max_tokens`) is a 422, not a silent
default. Resource fields follow Gemini's cachedContents; query usage follows OpenAI.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.types import CompressionStats, ContextInfo, QueryResult

CONTEXT_ID_PATTERN = r"^ctx_[0-9a-f]{32}$"
CONTEXT_ID_EXAMPLE = "ctx_5f2b8c0e9a7d4b1c8e3f6a2d0b9c7e41"


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- contexts ------------------------------------------------------------------------------


MethodName = Literal["kvzip", "kvzip_plus", "kvzip_head", "streaming", "snapkv", "h2o", "none"]
"""Every compression method (service.config.METHODS); see docs/quality.md for how they do."""


class CompressionSpec(RequestModel):
    """How to compress a new context. A field left out takes the server's default."""

    method: MethodName = Field(
        default="kvzip",
        description=(
            '"kvzip" scores KV pairs by context reconstruction and evicts the rest; '
            '"kvzip_plus" the same with the KVzip+ normalisation; "kvzip_head" keeps whole '
            "heads by calibrated head scores (needs `kvzip calibrate` once per model); "
            '"streaming", "snapkv" and "h2o" are the baselines (recency, attention of the '
            'last 32 context tokens, accumulated attention); "none" keeps the full cache.'
        ),
        examples=["kvzip"],
    )
    ratio: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="Fraction of the document's KV pairs to keep, in (0, 1].",
        examples=[0.3],
    )


DisplayName = Annotated[
    str | None,
    Field(max_length=512, description="A label for people.", examples=["Q3 report"]),
]


class ContextCreate(RequestModel):
    """A document to register. The same text and settings always give the same context."""

    text: str = Field(
        description="The document. Must contain something besides whitespace (else 400).",
        examples=["The pass key is 48213. Remember it. ..."],
    )
    display_name: DisplayName = None
    compression: CompressionSpec | None = Field(
        default=None, description="Compression settings; the server's defaults when left out."
    )


class ContextUsage(BaseModel):
    context_tokens: int = Field(description="Tokens in the document.", examples=[1523])


class CompressionPublic(BaseModel):
    method: str = Field(examples=["kvzip"])
    ratio: float = Field(description="Requested kept fraction.", examples=[0.3])
    kept_kv_pairs: int = Field(description="KV pairs kept, over all layers and heads.")
    total_kv_pairs: int = Field(description="KV pairs before compression.")
    kept_fraction: float = Field(description="kept_kv_pairs / total_kv_pairs.", examples=[0.3])
    bytes: int = Field(description="Size of the compressed cache.")

    @classmethod
    def from_stats(cls, stats: CompressionStats) -> CompressionPublic:
        return cls(
            method=stats.method,
            ratio=stats.ratio,
            kept_kv_pairs=stats.kept_kv_pairs,
            total_kv_pairs=stats.total_kv_pairs,
            kept_fraction=stats.kept_fraction,
            bytes=stats.bytes,
        )


class ContextPublic(BaseModel):
    """A registered context."""

    id: str = Field(examples=[CONTEXT_ID_EXAMPLE])
    name: str = Field(description='"contexts/<id>".', examples=[f"contexts/{CONTEXT_ID_EXAMPLE}"])
    display_name: DisplayName
    model: str = Field(examples=["SmolLM2-135M-Instruct"])
    state: str = Field(description="PROCESSING, READY or FAILED.", examples=["READY"])
    create_time: datetime = Field(description="RFC 3339, UTC.")
    usage: ContextUsage
    compression: CompressionPublic

    @classmethod
    def from_info(cls, info: ContextInfo) -> ContextPublic:
        created = info.create_time
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        return cls(
            id=info.id,
            name=f"contexts/{info.id}",
            display_name=info.display_name,
            model=info.model,
            state=info.state,
            create_time=created.astimezone(UTC),
            usage=ContextUsage(context_tokens=info.context_tokens),
            compression=CompressionPublic.from_stats(info.compression),
        )


# --- queries -------------------------------------------------------------------------------


class QueryCreate(RequestModel):
    """A question about one context."""

    question: str = Field(min_length=1, examples=["What is the pass key?"])
    max_new_tokens: int = Field(
        default=128,
        ge=1,
        description="Most tokens to generate; at most the server's max_new_tokens_limit.",
        examples=[128],
    )
    temperature: float = Field(
        default=0.0, ge=0.0, le=2.0, description="0 is greedy decoding.", examples=[0.0]
    )
    ratio: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=(
            "Answer from a smaller cache: re-select the stored scores at this kept fraction "
            "(no model run over the context). At most the context's stored ratio (else 400)."
        ),
        examples=[0.2],
    )


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens served from the compressed cache.")


class QueryUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class QueryTimings(BaseModel):
    load_s: float = Field(description="Seconds to get the compressed cache resident.")
    ttft_s: float = Field(description="Seconds to the first generated token.")
    decode_s: float = Field(description="Seconds spent generating.")


class QueryPublic(BaseModel):
    """The answer to one question."""

    answer: str = Field(examples=["48213"])
    usage: QueryUsage
    timings: QueryTimings
    finish_reason: str = Field(description='"stop" (EOS) or "length".', examples=["stop"])

    @classmethod
    def from_result(cls, result: QueryResult) -> QueryPublic:
        usage = QueryUsage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.total_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens),
        )
        timings = QueryTimings(
            load_s=result.timings.load_s,
            ttft_s=result.timings.ttft_s,
            decode_s=result.timings.decode_s,
        )
        return cls(
            answer=result.answer,
            usage=usage,
            timings=timings,
            finish_reason=result.finish_reason,
        )


# --- health and errors ---------------------------------------------------------------------


class HealthPublic(BaseModel):
    status: str = Field(examples=["ok"])


class ErrorBody(BaseModel):
    code: str = Field(description="Stable snake_case error code.", examples=["context_not_found"])
    message: str = Field(examples=[f"context '{CONTEXT_ID_EXAMPLE}' not found"])
    detail: list[dict[str, Any]] | None = Field(
        default=None, description="Per-field validation errors (422 only)."
    )


class ErrorPublic(BaseModel):
    """Every error response has this shape."""

    error: ErrorBody
