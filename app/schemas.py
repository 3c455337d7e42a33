"""HTTP request/response bodies: `XCreate` comes in, `XPublic` goes out.

Request bodies forbid unknown fields, so a typo (`max_tokens`) is a 422, not a silent
default. Resource fields follow Gemini's cachedContents; query usage follows OpenAI.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from service.types import CompressionStats, ContextInfo, QueryResult

CONTEXT_ID_PATTERN = r"^ctx_[0-9a-f]{32}$"
UNSUPPORTED_PARAMETER = "unsupported_parameter"
"""The validation error type (and error code) of a field the server does not implement: 400."""
CONTEXT_ID_EXAMPLE = "ctx_5f2b8c0e9a7d4b1c8e3f6a2d0b9c7e41"


class RequestModel(BaseModel):
    """Unknown fields are refused, and so are values of the wrong JSON type (`"wait": 0`)
    and non-finite numbers (`1e400`, `NaN`, `Infinity`)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def integral(value: Any) -> Any:
    """8.0 is the integer 8 in JSON (and JSON Schema); strict mode alone would refuse it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(integral)]
"""An integer that also accepts its integral float spelling (8.0), and nothing else."""

LaxDatetime = Annotated[datetime, Field(strict=False)]
"""A datetime that JSON carries as an RFC 3339 string (strict mode would want an object)."""

MIN_TTL_SECONDS = 60
"""The shortest lifetime a request may ask for (a context must outlive its first questions)."""


# --- contexts ------------------------------------------------------------------------------


MethodName = Literal[
    "kvzip", "kvzip_plus", "kvzip_head", "kvzap", "streaming", "snapkv", "h2o", "none"
]
"""Every compression method (service.config.METHODS); see docs/quality.md for how they do."""


class CompressionSpec(RequestModel):
    """How to compress a new context. A field left out takes the server's default."""

    method: MethodName = Field(
        default="kvzip",
        description=(
            '"kvzip" scores KV pairs by context reconstruction and evicts the rest; '
            '"kvzip_plus" the same with the KVzip+ normalisation; "kvzip_head" keeps whole '
            "heads by calibrated head scores (needs `kvzip calibrate` once per model; a "
            "ratio below KVZIP_HEAD_MIN_RATIO, 0.3 by default, is a 422); "
            '"kvzap" predicts KVzip ranks from hidden states during the prefill itself '
            "(needs `kvzip calibrate-scorer` once per model); "
            '"streaming", "snapkv" and "h2o" are the baselines (recency, attention of the '
            "last 32 context tokens, heavy hitters + recent tokens), all keeping the same "
            'protected prefix as kvzip; "none" keeps the full cache.'
        ),
        examples=["kvzip"],
    )
    threshold: float | None = Field(
        default=None,
        ge=-100.0,
        le=100.0,
        description=(
            'Method "kvzap" only (else 400): keep the KV pairs whose predicted score is '
            ">= threshold, plus the most recent 128 tokens, instead of a fixed ratio; the "
            "context reports the ratio it achieved. With `kvzip calibrate-scorer`'s rank "
            "targets the score is a normal score (0 keeps about half the pairs); with NVIDIA's "
            "released weights a log KVzip+ score (-4 in the KVzap paper)."
        ),
        examples=[-4.0],
    )
    ratio: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="Fraction of the document's KV pairs to keep, in (0, 1].",
        examples=[0.3],
    )
    quantization: Literal["none", "fp8", "int4"] | None = Field(
        default=None,
        description=(
            "How the kept keys/values are stored (dequantized on the device when loaded); "
            "left out or null: the server's default, KVZIP_DEFAULT_QUANTIZATION (fp8 unless "
            "the operator set it otherwise). "
            '"none" in the model dtype; "fp8" float8 e4m3 of each value minus its KV head '
            "and channel's mean, with a scale per KV head and channel (about half the bytes "
            'of bf16); "int4" asymmetric 4-bit, keys grouped '
            "per channel over `group_size` tokens, values per token over `group_size` "
            "channels (about a quarter). See docs/quality.md for the fidelity of each."
        ),
        examples=["fp8"],
    )
    group_size: Literal[32, 64, 128] = Field(
        default=64,
        description="int4 only: tokens per key group and channels per value group.",
        examples=[64],
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
    system: str | None = Field(
        default=None,
        description=(
            "A system instruction, placed in the protected prefix (always kept, never "
            "compressed) and used by every question; part of the context's identity."
        ),
        examples=["Answer in one short sentence."],
    )
    ttl_seconds: float | None = Field(
        default=None,
        ge=MIN_TTL_SECONDS,
        description=(
            "Lifetime in seconds, at least 60 (the server's default, 1 hour, when left out; at "
            "most the server's max_ttl_seconds). Registering the same document again keeps it "
            "alive at least this long."
        ),
        examples=[3600],
    )
    wait: bool = Field(
        default=True,
        description=(
            "false: answer 202 at once with state PROCESSING, and poll GET for `progress`."
        ),
        examples=[True],
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "text": "The pass key is 48213. Remember it. ...",
                    "display_name": "pass key",
                    "compression": {"method": "kvzip", "ratio": 0.3},
                    "ttl_seconds": 3600,
                },
                {"text": "A long report ...", "system": "Answer briefly.", "wait": False},
            ]
        }
    )


class ContextUpdate(RequestModel):
    """A new expiry: exactly one of `ttl_seconds` (from now) or `expire_time`."""

    ttl_seconds: Annotated[float, Field(ge=MIN_TTL_SECONDS)] | SkipJsonSchema[None] = Field(
        default=None, description="Seconds from now, at least 60.", examples=[7200]
    )
    expire_time: LaxDatetime | SkipJsonSchema[None] = Field(
        default=None,
        description="RFC 3339 instant in the future (UTC when no offset is given).",
        examples=["2030-01-01T00:00:00Z"],
    )

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": ["ttl_seconds"]}, {"required": ["expire_time"]}],
            "examples": [{"ttl_seconds": 7200}, {"expire_time": "2030-01-01T00:00:00Z"}],
        }
    )


class ContextUsage(BaseModel):
    context_tokens: int = Field(description="Tokens in the document.", examples=[1523])


class CompressionPublic(BaseModel):
    method: str = Field(examples=["kvzip"])
    ratio: float = Field(description="Requested kept fraction.", examples=[0.3])
    kept_kv_pairs: int = Field(description="KV pairs kept, over all layers and heads.")
    total_kv_pairs: int = Field(description="KV pairs before compression.")
    kept_fraction: float = Field(description="kept_kv_pairs / total_kv_pairs.", examples=[0.3])
    bytes: int = Field(description="Size of the compressed cache as stored.")
    quantization: str = Field(default="none", description="How the keys/values are stored.")
    bytes_full_bf16: int = Field(
        default=0,
        description=(
            "What the full, unevicted cache would take in bf16 (2 bytes x K,V x layers x KV "
            "heads x head_dim x tokens); bytes / bytes_full_bf16 is the saving. 0: unknown "
            "(a context stored by an older version)."
        ),
    )

    @classmethod
    def from_stats(cls, stats: CompressionStats) -> CompressionPublic:
        return cls(
            method=stats.method,
            ratio=stats.ratio,
            kept_kv_pairs=stats.kept_kv_pairs,
            total_kv_pairs=stats.total_kv_pairs,
            kept_fraction=stats.kept_fraction,
            bytes=stats.bytes,
            quantization=stats.quantization,
            bytes_full_bf16=stats.bytes_full_bf16,
        )


class ContextPublic(BaseModel):
    """A registered context."""

    id: str = Field(examples=[CONTEXT_ID_EXAMPLE])
    name: str = Field(description='"contexts/<id>".', examples=[f"contexts/{CONTEXT_ID_EXAMPLE}"])
    display_name: DisplayName
    model: str = Field(examples=["SmolLM2-135M-Instruct"])
    state: str = Field(description="PROCESSING, READY or FAILED.", examples=["READY"])
    create_time: datetime = Field(description="RFC 3339, UTC.")
    expire_time: datetime | None = Field(
        default=None, description="RFC 3339, UTC; the context answers 404 from then on."
    )
    progress: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of the document's tokens scored (1 once READY).",
        examples=[1.0],
    )
    error: str | None = Field(default=None, description="Why the ingest failed (FAILED only).")
    usage: ContextUsage
    compression: CompressionPublic

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": CONTEXT_ID_EXAMPLE,
                    "name": f"contexts/{CONTEXT_ID_EXAMPLE}",
                    "display_name": "pass key",
                    "model": "SmolLM2-135M-Instruct",
                    "state": "READY",
                    "create_time": "2025-03-14T15:09:26Z",
                    "expire_time": "2025-03-14T16:09:26Z",
                    "progress": 1.0,
                    "usage": {"context_tokens": 1626},
                    "compression": {
                        "method": "kvzip",
                        "ratio": 0.3,
                        "kept_kv_pairs": 43902,
                        "total_kv_pairs": 146340,
                        "kept_fraction": 0.3,
                        "bytes": 2652188,
                        "quantization": "fp8",
                        "bytes_full_bf16": 17564160,
                    },
                }
            ]
        }
    )

    @classmethod
    def from_info(cls, info: ContextInfo) -> ContextPublic:
        return cls(
            id=info.id,
            name=f"contexts/{info.id}",
            display_name=info.display_name,
            model=info.model,
            state=info.state,
            create_time=_utc(info.create_time),
            expire_time=_utc(info.expire_time) if info.expire_time else None,
            progress=min(max(info.progress, 0.0), 1.0),
            error=info.error,
            usage=ContextUsage(context_tokens=info.context_tokens),
            compression=CompressionPublic.from_stats(info.compression),
        )


class ContextListPublic(BaseModel):
    """One page of the caller's contexts, oldest first."""

    contexts: list[ContextPublic]
    next_page_token: str | None = Field(
        default=None, description="Pass as `page_token` for the next page; absent on the last."
    )

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"contexts": [], "next_page_token": None}]}
    )


def _utc(moment: datetime) -> datetime:
    """Naive datetimes are UTC; aware ones are converted to it."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


# --- queries -------------------------------------------------------------------------------


MAX_STOP_SEQUENCES = 4
"""Most stop strings a request may give (each is matched against the text on every token)."""
MAX_STOP_LENGTH = 256
"""Longest stop string, in characters."""
StopSequence = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
StopSequences = Annotated[
    list[StopSequence],
    Field(
        max_length=MAX_STOP_SEQUENCES,
        description=(
            f"Up to {MAX_STOP_SEQUENCES} strings of at most {MAX_STOP_LENGTH} characters; "
            "the answer ends before the first one generated."
        ),
    ),
]
"""The stop list of both query routes (native and OpenAI), validated the same way."""
MAX_SEED = 2**53 - 1
"""The largest seed (exact in every JSON implementation)."""
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(integral)]


class QueryCreate(RequestModel):
    """A question about one context."""

    question: str = Field(min_length=1, examples=["What is the pass key?"])
    max_new_tokens: JsonInt = Field(
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
    top_p: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling mass (used when temperature > 0).",
        examples=[0.9],
    )
    seed: Seed | None = Field(
        default=None,
        description="Makes sampling repeatable.",
        examples=[1234],
    )
    stop: StopSequences | None = Field(default=None, examples=[["\n\n"]])
    stream: bool = Field(
        default=False,
        description=(
            'true: Server-Sent Events, one `data: {"delta": ...}` per text chunk, then one '
            "event with the full answer, usage and timings, then `data: [DONE]`."
        ),
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"question": "What is the pass key?", "max_new_tokens": 16},
                {
                    "question": "Summarise the report.",
                    "max_new_tokens": 200,
                    "temperature": 0.7,
                    "top_p": 0.9,
                    "seed": 7,
                    "stop": ["\n\n"],
                    "stream": True,
                },
            ]
        }
    )


class QueryChunkPublic(BaseModel):
    """One streamed event of an answer: the next piece of its text."""

    delta: str = Field(examples=["The pass"])


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
    finish_reason: str = Field(
        description='"stop" (end of sequence or a stop sequence) or "length".', examples=["stop"]
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "answer": "The pass key is 48213.",
                    "usage": {
                        "prompt_tokens": 1660,
                        "completion_tokens": 9,
                        "total_tokens": 1669,
                        "prompt_tokens_details": {"cached_tokens": 1648},
                    },
                    "timings": {"load_s": 0.002, "ttft_s": 0.09, "decode_s": 0.21},
                    "finish_reason": "stop",
                }
            ]
        }
    )

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
