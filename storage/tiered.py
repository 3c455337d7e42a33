"""A store over several tiers, fastest first (memory -> redis -> disk).

Reads go through the tiers in order; the first hit is promoted (put) into every faster tier.
Writes go to the durable tier first (the first name in `write_order`; by default the last,
slowest tier, i.e. disk), then to the others, so an object is never only in a volatile tier.

Degrading: a `TierUnavailableError` (a Redis that is down) is logged and skipped, except where
it would hide a failure of record: on `get` from the last tier, and on any operation of the
durable tier, it propagates.

TTL: `put` passes `ttl_s` to every tier. A promoted copy cannot know the remaining lifetime of
the copy it came from, so it gets `promote_ttl_s` (None: the tier's own default, which for a
RedisTier built with `default_ttl_s` is still a TTL, so every Redis key expires; the context
record owns expiry and deletes through this store).

Reads pay for no promotion into a shared tier: `get_view` (the context load path) hands the
disk tier's memory map back at once and copies it into Redis in the background (one copy
per key at a time; `settle()` waits for them), so a read from disk never waits for a GB
written to Redis first.

Integrity: a tier that finds its copy damaged (CorruptObjectError; it removed the copy) is
a miss, so the read goes on to the next tier; `get_view` writes the good copy it then finds
back into the damaged disk tier. Promotion never rewrites an object a tier did not keep:
one that a tier dropped right after the write (larger than a Redis cache's memory, or a
memory tier's capacity) is not offered to that tier again for `REFUSAL_S` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from redis.asyncio import Redis

from storage._ttl import check_ttl
from storage.base import (
    CorruptObjectError,
    PendingRead,
    Tier,
    TierFullError,
    TierUnavailableError,
    validate_key,
)
from storage.disk_tier import DiskTier
from storage.memory_tier import MemoryTier
from storage.redis_tier import RedisTier

logger = logging.getLogger(__name__)

T = TypeVar("T")

REFUSAL_S = 600.0
"""How long a tier that dropped a promoted object is not offered objects that large."""


class TieredStore:
    """Read-through, write-durable-first store over `tiers` (ordered fastest first)."""

    name = "tiered"

    def __init__(
        self,
        tiers: Sequence[Tier],
        write_order: Sequence[str] | None = None,
        *,
        promote_ttl_s: float | None = None,
    ) -> None:
        names = [t.name for t in tiers]
        if not tiers or len(set(names)) != len(names):
            raise ValueError(f"tiers must be non-empty with unique names, got {names}")
        order = list(reversed(names)) if write_order is None else list(write_order)
        if sorted(order) != sorted(names):
            raise ValueError(f"write_order {order} must name each tier of {names} exactly once")
        self._tiers = list(tiers)
        self._by_name = {t.name: t for t in tiers}
        self._write_order = [self._by_name[n] for n in order]
        self.promote_ttl_s = check_ttl(promote_ttl_s)
        self._refused: dict[str, tuple[int, float]] = {}  # tier -> (size, until monotonic)
        self._promotions: dict[str, asyncio.Task[None]] = {}  # key -> its background copy

    @property
    def tiers(self) -> list[Tier]:
        """The tiers, fastest first."""
        return list(self._tiers)

    @property
    def durable(self) -> Tier:
        """The tier written first, whose failures always propagate."""
        return self._write_order[0]

    def tier(self, name: str) -> Tier:
        """The tier called `name` (KeyError when there is none)."""
        return self._by_name[name]

    async def get(self, key: str) -> bytes | None:
        """The first tier's hit, promoted into every faster tier; None when all miss."""
        validate_key(key)
        last = len(self._tiers) - 1
        for index, tier in enumerate(self._tiers):
            try:
                data = await tier.get(key)
            except TierUnavailableError as exc:
                if index == last:
                    raise
                self._log_skip(tier, "get", key, exc)
                continue
            except CorruptObjectError as exc:
                logger.error("storage tier %r dropped a damaged copy: %s", tier.name, exc)
                continue
            if data is not None:
                await self._promote(key, data, self._tiers[:index])
                return data
        return None

    async def get_view(self, key: str) -> bytes | memoryview | None:
        """The object the cheapest way: a memory tier's bytes, else a read-only memory map of
        a disk tier's file (no copy; promoted into the shared tiers before it that lack it,
        i.e. Redis), else `get` through the tiers. A damaged disk copy is dropped and, when
        another tier holds a good one, rewritten from it."""
        pending = await self.open_view(key)
        return None if pending is None else await pending.settled

    async def open_view(self, key: str) -> PendingRead | None:
        """`get_view` that hands a disk tier's map out before its checksum is known, so that
        decoding it and checking it overlap (see PendingRead: use nothing made from `data`
        unless `settled` ends with `data` itself). Promotion into the shared tiers waits
        for the check."""
        validate_key(key)
        for index, tier in enumerate(self._tiers):
            if isinstance(tier, MemoryTier) and (data := await tier.get(key)) is not None:
                return PendingRead.of(data)
            if not isinstance(tier, DiskTier) or (pending := await tier.open_view(key)) is None:
                continue
            shared = [t for t in self._tiers[:index] if not isinstance(t, MemoryTier)]
            settle = self._settle(key, tier, pending, shared)
            return PendingRead(pending.data, asyncio.ensure_future(settle))
        data = await self.get(key)
        return None if data is None else PendingRead.of(data)

    async def _settle(
        self, key: str, tier: DiskTier, pending: PendingRead, shared: Sequence[Tier]
    ) -> bytes | memoryview | None:
        """The disk copy once verified (then copied into `shared` in the background), else
        the good copy of another tier, written back into `tier`."""
        try:
            view = await pending.settled
        except CorruptObjectError as exc:
            logger.error("storage tier %r dropped a damaged copy: %s", tier.name, exc)
            return await self._restore(key, tier, exc.ttl_s)
        assert view is not None  # a disk tier's check ends with its view or raises
        self._promote_in_background(key, view, shared)
        return view

    def _promote_in_background(
        self, key: str, data: bytes | memoryview, shared: Sequence[Tier]
    ) -> None:
        """Copy `data` into the `shared` tiers that lack it, off the read's path."""
        if not shared or key in self._promotions:
            return
        task = asyncio.get_running_loop().create_task(
            self._promote(key, data, shared, only_missing=True)
        )
        self._promotions[key] = task
        task.add_done_callback(lambda done: self._promoted(key, done))

    def _promoted(self, key: str, task: asyncio.Task[None]) -> None:
        if self._promotions.get(key) is task:  # not a later copy of the same key
            del self._promotions[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("background copy of %r into a shared tier failed: %r", key, exc)

    @property
    def promoting(self) -> int:
        """How many background copies into shared tiers are running now."""
        return len(self._promotions)

    async def settle(self) -> None:
        """Wait until every background copy into a shared tier has ended."""
        while self._promotions:
            await asyncio.gather(*self._promotions.values(), return_exceptions=True)

    async def retain(self, key: str, ttl_s: float) -> None:
        """Keep `key` at least `ttl_s` more seconds in the tiers whose copies expire on their
        own schedule (disk; see DiskTier.retain). Cache tiers keep their own TTLs."""
        validate_key(key)
        for tier in self._tiers:
            if isinstance(tier, DiskTier):
                await tier.retain(key, ttl_s)

    async def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        """Write the durable tier first, then the others in `write_order`."""
        validate_key(key)
        check_ttl(ttl_s)
        for tier in self._write_order:
            await self._call(tier, "put", key, lambda t: t.put(key, data, ttl_s), None)

    async def delete(self, key: str) -> bool:
        """Remove `key` from every tier (first stopping a background copy of it, which
        would write it back); True when any tier had it."""
        validate_key(key)
        copying = self._promotions.pop(key, None)
        if copying is not None:
            copying.cancel()
            await asyncio.gather(copying, return_exceptions=True)
        removed = False
        for tier in self._write_order:
            removed |= await self._call(tier, "delete", key, lambda t: t.delete(key), False)
        return removed

    async def exists(self, key: str) -> bool:
        """True when any tier holds `key` (fastest first, stopping at the first yes)."""
        validate_key(key)
        for tier in self._tiers:
            if await self._call(tier, "exists", key, lambda t: t.exists(key), False):
                return True
        return False

    async def keys(self, prefix: str = "") -> list[str]:
        """The union of every tier's keys starting with `prefix`, sorted."""
        found: set[str] = set()
        for tier in self._tiers:
            found.update(await self._call(tier, "keys", prefix, lambda t: t.keys(prefix), []))
        return sorted(found)

    async def _promote(
        self,
        key: str,
        data: bytes | memoryview,
        faster: Sequence[Tier],
        *,
        only_missing: bool = False,
    ) -> None:
        """Copy `data` into `faster` tiers (those that lack it, with `only_missing`), except
        into a tier that recently dropped an object this large."""
        for tier in faster:
            if self._refuses(tier, len(data)):
                continue
            try:
                if only_missing and await tier.exists(key):
                    continue
                if isinstance(tier, RedisTier):  # sends a view's parts without a copy
                    await tier.put(key, data, self.promote_ttl_s)
                else:
                    await tier.put(key, bytes(data), self.promote_ttl_s)
                if not await tier.exists(key):  # evicted at once: it does not fit there
                    self._refuse(tier, len(data))
            except TierUnavailableError as exc:
                self._log_skip(tier, "promote", key, exc)
            except TierFullError:
                self._refuse(tier, len(data))

    def _refuses(self, tier: Tier, size: int) -> bool:
        refused = self._refused.get(tier.name)
        if refused is None:
            return False
        if time.monotonic() >= refused[1]:
            del self._refused[tier.name]
            return False
        return size >= refused[0]

    def _refuse(self, tier: Tier, size: int) -> None:
        """Remember that `tier` does not keep objects of `size` bytes (for REFUSAL_S)."""
        if not self._refuses(tier, size):
            logger.warning(
                "storage tier %r does not keep objects of %d bytes; not promoting objects that "
                "large into it for %.0f s",
                tier.name,
                size,
                REFUSAL_S,
            )
        self._refused[tier.name] = (size, time.monotonic() + REFUSAL_S)

    async def _restore(self, key: str, damaged: Tier, ttl_s: float | None) -> bytes | None:
        """The object from the other tiers, written back into `damaged` (its copy failed its
        checksum) with the lifetime the damaged copy had left."""
        data = await self.get(key)
        if data is not None:
            try:
                await damaged.put(key, data, ttl_s)
            except (TierFullError, TierUnavailableError) as exc:
                logger.warning("could not restore %s into %r: %s", key, damaged.name, exc)
        return data

    async def _call(
        self,
        tier: Tier,
        op: str,
        key: str,
        call: Callable[[Tier], Awaitable[T]],
        fallback: T,
    ) -> T:
        """`call(tier)`; an unavailable non-durable tier is logged and gives `fallback`."""
        try:
            return await call(tier)
        except TierUnavailableError as exc:
            if tier is self.durable:
                raise
            self._log_skip(tier, op, key, exc)
            return fallback

    @staticmethod
    def _log_skip(tier: Tier, op: str, key: str, exc: TierUnavailableError) -> None:
        logger.warning("storage tier %r skipped on %s(%r): %s", tier.name, op, key, exc)


def build_store(
    memory_bytes: int,
    disk_root: Path,
    redis: Redis | None = None,
    *,
    redis_prefix: str = "kvzip:",
    redis_ttl_s: float | None = None,
    disk_capacity_bytes: int | None = None,
    disk_evictable: Callable[[str], bool] | None = None,
) -> TieredStore:
    """The standard store: memory LRU -> Redis (when a client is given) -> disk.

    Writes go to disk first, then Redis, then memory; every Redis key carries `redis_ttl_s`
    (also on copies promoted from disk), so the Redis tier never holds a key forever. The
    disk tier holds at most `disk_capacity_bytes` (None: no cap), evicting only the keys
    `disk_evictable` allows.
    """
    tiers: list[Tier] = [MemoryTier(memory_bytes)]
    if redis is not None:
        tiers.append(RedisTier(redis, prefix=redis_prefix, default_ttl_s=redis_ttl_s))
    tiers.append(DiskTier(disk_root, capacity_bytes=disk_capacity_bytes, evictable=disk_evictable))
    return TieredStore(tiers)
