"""Shared TTL helpers for the tiers (private)."""

from __future__ import annotations

import math


def check_ttl(ttl_s: float | None) -> float | None:
    """Return `ttl_s` unchanged, or raise ValueError unless it is None or a finite number > 0."""
    if ttl_s is not None and not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"ttl_s must be a positive number of seconds or None, got {ttl_s!r}")
    return ttl_s
