"""Request checks shared by every ContextService implementation, run before any work is
queued (no torch here, so the torch-free distributed API runs exactly the same checks as
the embedded service)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from service.config import GROUP_SIZES, METHODS, QUANTIZATIONS, CompressionConfig, ServiceConfig
from service.errors import InvalidInputError, UnsupportedRatioError
from service.types import (
    ANY_TENANT,
    TURN_ROLES,
    CreateContextRequest,
    QueryRequest,
    SamplingParams,
)

MIN_TEMPERATURE = 1e-5
"""Below this, sampling is greedy decoding (its limit); logits / T would overflow float32."""


@dataclass(frozen=True)
class CheckedCreate:
    """A registration that passed every check: its normalised compression and lifetime."""

    request: CreateContextRequest
    compression: CompressionConfig
    ttl_s: float


def validated_compression(compression: CompressionConfig) -> CompressionConfig:
    """The settings normalised (`none` keeps everything), or InvalidInputError."""
    if compression.method not in METHODS:
        raise InvalidInputError(f"unknown compression method {compression.method!r}; use {METHODS}")
    if not (math.isfinite(compression.ratio) and 0.0 < compression.ratio <= 1.0):
        raise InvalidInputError(f"ratio must be in (0, 1]. Given: {compression.ratio}")
    if compression.chunk_size < 16:
        raise InvalidInputError(f"chunk_size must be >= 16. Given: {compression.chunk_size}")
    if compression.quantization not in QUANTIZATIONS:
        raise InvalidInputError(
            f"unknown quantization {compression.quantization!r}; use {QUANTIZATIONS}"
        )
    if compression.group_size not in GROUP_SIZES:
        raise InvalidInputError(
            f"group_size must be one of {GROUP_SIZES}. Given: {compression.group_size}"
        )
    return compression.normalized()


def checked_ttl(ttl_seconds: float | None, config: ServiceConfig) -> float:
    """The lifetime a registration asks for (the default when None), within the bounds."""
    ttl = config.default_ttl_s if ttl_seconds is None else ttl_seconds
    if not (math.isfinite(ttl) and 0 < ttl <= config.max_ttl_s):
        raise InvalidInputError(f"ttl_seconds must be in (0, {config.max_ttl_s:g}]. Given: {ttl:g}")
    return ttl


def checked_method_ratio(method: str, ratio: float, floor: float, field: str) -> None:
    """UnsupportedRatioError when `method` is asked for a kept ratio below its measured floor
    (`kvzip_head` below `floor`, ServiceConfig.kvzip_head_min_ratio)."""
    if method == "kvzip_head" and ratio < floor - 1e-9:
        raise UnsupportedRatioError(
            f"{field} must be >= {floor:g} for method kvzip_head. Given: {ratio:g}. It keeps "
            "whole heads, and below this ratio it loses about half of the facts the full "
            "cache retrieves (docs/quality.md); use method kvzip for smaller ratios"
        )


def checked_query_ratio(ratio: float | None, method: str, stored: float, floor: float) -> None:
    """A query-time ratio: at most the context's stored ratio, and within its method's floor."""
    if ratio is None:
        return
    if ratio > stored + 1e-9:
        raise InvalidInputError(
            f"ratio must be <= the context's stored ratio ({stored}). Given: {ratio}"
        )
    checked_method_ratio(method, ratio, floor, "ratio")


def validated_create(request: CreateContextRequest, config: ServiceConfig) -> CheckedCreate:
    """Every check of `POST /contexts` that needs no model."""
    compression = validated_compression(request.compression)
    checked_method_ratio(
        compression.method, compression.ratio, config.kvzip_head_min_ratio, "compression.ratio"
    )
    ttl = checked_ttl(request.ttl_seconds, config)
    if request.tenant == ANY_TENANT:
        raise InvalidInputError(f"tenant {ANY_TENANT!r} cannot own a context")
    if not request.text.strip():
        raise InvalidInputError("text must contain at least one non-whitespace character")
    return CheckedCreate(request, compression, ttl)


def checked_sampling(sampling: SamplingParams, max_new_tokens_limit: int) -> SamplingParams:
    """The sampling settings within bounds; a temperature below MIN_TEMPERATURE is greedy."""
    if sampling.max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be >= 1. Given: {sampling.max_new_tokens}")
    if sampling.max_new_tokens > max_new_tokens_limit:
        raise InvalidInputError(
            f"max_new_tokens must be <= {max_new_tokens_limit}. Given: {sampling.max_new_tokens}"
        )
    if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        raise InvalidInputError(f"temperature must be >= 0. Given: {sampling.temperature}")
    if not (math.isfinite(sampling.top_p) and 0 < sampling.top_p <= 1):
        raise InvalidInputError(f"top_p must be in (0, 1]. Given: {sampling.top_p}")
    if 0 < sampling.temperature < MIN_TEMPERATURE:
        return replace(sampling, temperature=0.0)
    return sampling


def validated_query(request: QueryRequest, config: ServiceConfig) -> QueryRequest:
    """Every check of a question that needs neither the model nor the context."""
    if not request.question.strip():
        raise InvalidInputError("question must contain at least one non-whitespace character")
    for index, turn in enumerate(request.history):
        if turn.role not in TURN_ROLES:
            raise InvalidInputError(
                f"history[{index}].role must be one of {TURN_ROLES}. Given: {turn.role!r}"
            )
    if request.ratio is not None and not (math.isfinite(request.ratio) and 0 < request.ratio <= 1):
        raise InvalidInputError(f"ratio must be in (0, 1]. Given: {request.ratio}")
    sampling = checked_sampling(request.sampling, config.max_new_tokens_limit)
    return replace(request, sampling=sampling)


def checked_expiry(expire_time: datetime, max_ttl_s: float) -> datetime:
    """A future expiry at most `max_ttl_s` away, in UTC (naive times are read as UTC)."""
    if expire_time.tzinfo is None:
        expire_time = expire_time.replace(tzinfo=UTC)
    now = datetime.now(UTC)
    if expire_time <= now:
        raise InvalidInputError(f"expire_time must be in the future. Given: {expire_time}")
    if expire_time > now + timedelta(seconds=max_ttl_s + 1):
        raise InvalidInputError(
            f"expire_time must be at most {max_ttl_s:g} seconds from now. Given: {expire_time}"
        )
    return expire_time.astimezone(UTC)
