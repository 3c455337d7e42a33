"""Plain dataclasses exchanged between app/ and service/ (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from service.config import CompressionConfig

ANY_TENANT = "*"
"""The tenant of admin lookups: matches every tenant's contexts (never used to create one)."""


@dataclass(frozen=True)
class CompressionStats:
    """What compression achieved for one context (context pairs only; prefix excluded)."""

    method: str
    ratio: float
    kept_kv_pairs: int
    total_kv_pairs: int
    bytes: int
    quantization: str = "none"
    bytes_full_bf16: int = 0  # the full, unevicted cache in bf16; 0 when unknown

    @property
    def kept_fraction(self) -> float:
        return self.kept_kv_pairs / self.total_kv_pairs if self.total_kv_pairs else 1.0


@dataclass(frozen=True)
class ContextInfo:
    """The public view of one registered context."""

    id: str
    display_name: str | None
    model: str
    state: str  # "PROCESSING" | "READY" | "FAILED"
    create_time: datetime
    context_tokens: int
    compression: CompressionStats
    expire_time: datetime | None = None
    progress: float = 1.0  # fraction of context tokens scored (1.0 once READY)
    error: str | None = None  # why, when state == "FAILED"


@dataclass(frozen=True)
class CreateContextRequest:
    text: str
    display_name: str | None = None
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    tenant: str = ""
    system: str | None = None  # extra system instruction, part of the protected prefix
    ttl_seconds: float | None = None  # None = the service default
    wait: bool = True  # False: return at once with state PROCESSING


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


TURN_ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Turn:
    """One earlier message of a conversation: `role` is "user" or "assistant"."""

    role: str
    text: str


@dataclass(frozen=True)
class QueryRequest:
    """A question to one context. `instructions` and `history` are on the question side of
    the prompt, after the cached context (never part of it): the request's own system text
    first, then the earlier turns (oldest first), then `question` as the last user turn."""

    question: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tenant: str = ""
    ratio: float | None = None  # query-time ratio <= the stored one (pure re-selection)
    instructions: str = ""
    history: tuple[Turn, ...] = ()


@dataclass(frozen=True)
class QueryTimings:
    load_s: float
    ttft_s: float
    decode_s: float


@dataclass(frozen=True)
class QueryResult:
    answer: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    timings: QueryTimings
    finish_reason: str = "stop"  # "stop" | "length"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class QueryEvent:
    """One item of a streamed answer: a text delta, or the final event with the result."""

    delta: str = ""
    result: QueryResult | None = None  # set on the last event only


@dataclass(frozen=True)
class ContextPage:
    """One page of a context listing."""

    contexts: list[ContextInfo]
    next_page_token: str | None = None
