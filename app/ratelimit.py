"""Token buckets per key: the one interface the HTTP layer throttles with (`RateLimit`), and
the one place that picks its implementation (`build_rate_limits`).

embedded: `LocalRateLimiter`, buckets in this process. distributed:
`service.serving.distributed.ratelimit.RedisRateLimiter`, one bucket per key on Redis shared
by every API process, so N replicas allow the configured rate, not N times it (a Redis that
cannot be reached makes the limited routes 503). Both refill `per_minute / 60` tokens a second
up to `burst`, and a request takes one: the same math, the same answers.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections import OrderedDict
from typing import Protocol

from app.settings import Settings

__all__ = [
    "AUTH_FAILURES_PER_MINUTE",
    "AUTH_FAILURE_BURST",
    "LocalRateLimiter",
    "RateLimit",
    "build_rate_limits",
]

AUTH_FAILURES_PER_MINUTE = 30
"""Refill of each client address's bucket of requests without a valid key (401s)."""
AUTH_FAILURE_BURST = 10
"""401s a client address may collect at once before it is answered 429."""
MAX_BUCKETS = 10_000
"""Rate buckets kept per in-process limiter; the least recently used is forgotten beyond it."""


class RateLimit(Protocol):
    """Token buckets by key (an API key's digest, or a client address)."""

    async def acquire(self, key: str) -> float:
        """0 when the request may go (a token is taken); else the seconds until it may."""
        ...

    async def wait(self, key: str) -> float:
        """The seconds until `key` may go (0: now), taking nothing."""
        ...

    async def aclose(self) -> None:
        """Release what the limiter holds (a Redis client)."""
        ...


class LocalRateLimiter:
    """Token buckets in this process: `per_minute` refill, `burst` capacity; thread-safe.

    At most `max_buckets` buckets, least recently used evicted first (an evicted key starts
    again with a full bucket, as a new one does), so a stream of new keys or client
    addresses cannot grow the map without bound. `now` (monotonic seconds) is for tests.
    """

    def __init__(self, per_minute: int, burst: int, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (tokens, at)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)

    async def acquire(self, key: str, now: float | None = None) -> float:
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens = self._tokens(key, now)
            if tokens >= 1.0:
                self._store(key, tokens - 1.0, now)
                return 0.0
            self._store(key, tokens, now)
            return (1.0 - tokens) / self.rate

    async def wait(self, key: str, now: float | None = None) -> float:
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens = self._tokens(key, now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    async def aclose(self) -> None:
        """Nothing to release."""


def build_rate_limits(settings: Settings) -> tuple[RateLimit, RateLimit]:
    """The per-key request limiter and the per-address throttle of 401s: on Redis in
    distributed mode, in this process otherwise. The Redis module is imported by name, so
    an embedded app never loads the Redis client."""
    limits = [
        ("requests", settings.rate_limit_per_minute, settings.rate_limit_burst),
        ("auth-failures", AUTH_FAILURES_PER_MINUTE, AUTH_FAILURE_BURST),
    ]
    if settings.mode == "distributed" and settings.redis_url:
        module = importlib.import_module("service.serving.distributed.ratelimit")
        url, prefix = settings.redis_url, settings.redis_prefix
        requests, failures = (
            module.RedisRateLimiter.from_url(url, prefix, name, per_minute, burst)
            for name, per_minute, burst in limits
        )
    else:
        requests, failures = (LocalRateLimiter(rate, burst) for _, rate, burst in limits)
    return requests, failures
