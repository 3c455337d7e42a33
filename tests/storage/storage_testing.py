"""Helpers shared by the storage tests (a module, not conftest, so imports are unambiguous)."""

from __future__ import annotations

import asyncio
from uuid import uuid4

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from storage import RedisTier

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
CLOSE_S = 10.0  # the most a test's Redis cleanup may take


def make_client(port: int = REDIS_PORT, timeout_s: float = 2.0) -> Redis:
    """A binary client on 127.0.0.1 that fails fast (no retries)."""
    return Redis(
        host=REDIS_HOST,
        port=port,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class RedisEnv:
    """A lazily created client and a per-test prefix; everything under it is removed after."""

    def __init__(self) -> None:
        self.prefix = f"kvzip-test:{uuid4().hex}:"
        self._client: Redis | None = None

    @property
    def client(self) -> Redis:
        """The client, created on first use (so tests without Redis never connect)."""
        if self._client is None:
            self._client = make_client()
        return self._client

    def tier(self, part_bytes: int = 1000, default_ttl_s: float | None = None) -> RedisTier:
        """A tier on this test's prefix, with small parts so that chunking is exercised."""
        return RedisTier(
            self.client, prefix=self.prefix, part_bytes=part_bytes, default_ttl_s=default_ttl_s
        )

    async def stored_keys(self) -> list[str]:
        """Every Redis key under this test's prefix, sorted."""
        found = [k async for k in self.client.scan_iter(match=f"{self.prefix}*", count=1000)]
        return sorted(k.decode() for k in found)

    async def close(self, timeout_s: float = CLOSE_S) -> None:
        """Unlink everything under the prefix and close the client (when one was made), each
        within `timeout_s`: a Redis that hangs fails the teardown instead of hanging it, and
        the client is closed even when the cleanup failed."""
        if self._client is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                leftovers = await self.stored_keys()
                if leftovers:
                    await self._client.unlink(*leftovers)
        finally:
            async with asyncio.timeout(timeout_s):
                await self._client.aclose()
