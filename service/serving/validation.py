"""Request checks shared by every ContextService implementation (no torch here, so the
torch-free distributed API runs exactly the same checks as the embedded service)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from service.config import METHODS, CompressionConfig
from service.errors import InvalidInputError


def validated_compression(compression: CompressionConfig) -> CompressionConfig:
    """The settings normalised (`none` keeps everything), or InvalidInputError."""
    if compression.method not in METHODS:
        raise InvalidInputError(f"unknown compression method {compression.method!r}; use {METHODS}")
    if not 0.0 < compression.ratio <= 1.0:
        raise InvalidInputError(f"ratio must be in (0, 1]. Given: {compression.ratio}")
    if compression.chunk_size < 16:
        raise InvalidInputError(f"chunk_size must be >= 16. Given: {compression.chunk_size}")
    return compression.normalized()


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
