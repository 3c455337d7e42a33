"""Token buckets on Redis: one bucket per key shared by every API process of a deployment.

Each call runs one Lua script, atomically: refill the bucket by the time elapsed since its
last use (Redis TIME, one clock for every process), then take one token (`acquire`) or only
look (`wait`), and return the seconds until the next token (0 when one was there). A bucket
is a hash `{p}rate:<name>:<key>` of `tokens` and `at`, expiring once it would be full again
(an expired bucket and a new one are the same: full), so idle keys leave nothing behind.
The refill math is the in-process limiter's (app.ratelimit.LocalRateLimiter). Redis
unreachable: EngineUnavailableError (503), as for every other Redis outage: a limit that
cannot be checked is not waived. Needs Redis >= 5 (a script that writes after TIME).
"""

from __future__ import annotations

import math

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.errors import EngineUnavailableError
from service.serving.distributed.keys import RedisKeys
from service.serving.distributed.remote import REDIS_TIMEOUT_S
from storage import redis_client

__all__ = ["TOKEN_BUCKET_LUA", "RedisRateLimiter"]

TOKEN_BUCKET_LUA = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(saved[1]), tonumber(saved[2])
if tokens == nil or at == nil then
  tokens, at = burst, now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens < 1 then
  wait = (1 - tokens) / rate
elseif cost > 0 then
  tokens = tokens - cost
end
if cost > 0 then
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
             'at', string.format('%.17g', now))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return string.format('%.17g', wait)
"""
"""KEYS[1] the bucket; ARGV: tokens per second, burst, cost (1 take, 0 look), TTL in ms."""


class RedisRateLimiter:
    """`per_minute` refill, `burst` capacity, per key, across processes (see the module)."""

    def __init__(
        self,
        client: Redis,
        keys: RedisKeys,
        name: str,
        per_minute: int,
        burst: int,
        owns_client: bool = False,
    ) -> None:
        self.client, self.keys, self.name = client, keys, name
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.owns_client = owns_client
        self._script = client.register_script(TOKEN_BUCKET_LUA)

    @classmethod
    def from_url(
        cls, url: str, prefix: str, name: str, per_minute: int, burst: int
    ) -> RedisRateLimiter:
        """A limiter with its own short-timeout client, closed by `aclose`."""
        client = redis_client(url, timeout_s=REDIS_TIMEOUT_S, retries=0)
        return cls(client, RedisKeys(prefix), name, per_minute, burst, owns_client=True)

    @property
    def ttl_ms(self) -> int:
        """How long an untouched bucket lives: until it would be full again (+1 s)."""
        return math.ceil(self.burst / self.rate * 1000) + 1000

    async def acquire(self, key: str) -> float:
        """0 when the request may go (a token is taken); else the seconds until it may."""
        return await self._run(key, cost=1)

    async def wait(self, key: str) -> float:
        """The seconds until `key` may go (0: now), taking nothing."""
        return await self._run(key, cost=0)

    async def _run(self, key: str, cost: int) -> float:
        if self.rate <= 0:
            return 0.0
        bucket = self.keys.rate(self.name, key)
        args = [self.rate, self.burst, cost, self.ttl_ms]
        try:
            reply = await self._script(keys=[bucket], args=args)
        except (RedisError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise EngineUnavailableError(
                f"the rate limit cannot be checked: Redis is unreachable ({reason})"
            ) from exc
        return float(reply)

    async def aclose(self) -> None:
        if self.owns_client:
            await self.client.aclose()
