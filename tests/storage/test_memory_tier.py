"""MemoryTier: LRU by bytes, counters, TTL on an injected clock."""

from __future__ import annotations

import pytest

from storage import MemoryTier


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_evicts_least_recently_used_first() -> None:
    tier = MemoryTier(100)
    await tier.put("a", b"a" * 40)
    await tier.put("b", b"b" * 40)
    assert await tier.get("a") is not None  # a is now more recent than b
    await tier.put("c", b"c" * 40)
    assert await tier.keys() == ["a", "c"]
    assert tier.evictions == 1
    assert tier.bytes_used == 80


async def test_evicts_as_many_entries_as_the_bytes_need() -> None:
    tier = MemoryTier(100)
    for key in "abc":
        await tier.put(key, b"x" * 30)
    await tier.put("d", b"y" * 70)
    assert await tier.keys() == ["c", "d"]
    assert tier.evictions == 2
    assert tier.bytes_used == 100


async def test_exists_does_not_refresh_recency() -> None:
    tier = MemoryTier(10)
    await tier.put("a", b"12345")
    await tier.put("b", b"12345")
    assert await tier.exists("a")
    await tier.put("c", b"12345")
    assert await tier.keys() == ["b", "c"]


async def test_object_larger_than_capacity_is_not_stored_and_drops_the_old_value() -> None:
    tier = MemoryTier(10)
    await tier.put("a", b"small")
    await tier.put("b", b"tiny")
    await tier.put("a", b"far too large for ten bytes")
    assert await tier.get("a") is None
    assert await tier.get("b") == b"tiny"
    assert tier.bytes_used == 4
    assert tier.evictions == 0


async def test_replace_keeps_bytes_used_exact() -> None:
    tier = MemoryTier(100)
    await tier.put("a", b"x" * 50)
    await tier.put("a", b"x" * 20)
    assert tier.bytes_used == 20
    await tier.delete("a")
    assert tier.bytes_used == 0


async def test_counts_hits_and_misses() -> None:
    tier = MemoryTier(100)
    await tier.put("a", b"x")
    await tier.get("a")
    await tier.get("a")
    await tier.get("missing")
    assert (tier.hits, tier.misses) == (2, 1)


async def test_ttl_follows_the_clock() -> None:
    clock = FakeClock()
    tier = MemoryTier(100, clock=clock)
    await tier.put("a", b"x", ttl_s=5)
    clock.now += 4.9
    assert await tier.get("a") == b"x"
    clock.now += 0.1
    assert await tier.get("a") is None
    assert tier.bytes_used == 0


async def test_expired_entries_make_room_before_live_ones_are_evicted() -> None:
    clock = FakeClock()
    tier = MemoryTier(100, clock=clock)
    await tier.put("old", b"x" * 60, ttl_s=1)
    await tier.put("live", b"y" * 30)
    clock.now += 2
    await tier.put("new", b"z" * 60)
    assert await tier.keys() == ["live", "new"]
    assert tier.evictions == 0


def test_negative_capacity_is_refused() -> None:
    with pytest.raises(ValueError):
        MemoryTier(-1)
