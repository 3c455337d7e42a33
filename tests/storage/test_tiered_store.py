"""TieredStore: read-through promotion, durable-first writes, degrading past a down Redis,
damaged copies replaced from a good one, no promotion a tier refuses."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from storage import (
    DiskTier,
    MemoryTier,
    RedisTier,
    Tier,
    TieredStore,
    TierUnavailableError,
    build_store,
)
from tests.storage.storage_testing import RedisEnv, make_client


class RecordingTier:
    """Wraps a tier and appends (tier name, operation) to a shared log on every call."""

    def __init__(self, inner: Tier, log: list[tuple[str, str]]) -> None:
        self.name = inner.name
        self._inner = inner
        self._log = log

    async def get(self, key: str) -> bytes | None:
        self._log.append((self.name, "get"))
        return await self._inner.get(key)

    async def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        self._log.append((self.name, "put"))
        await self._inner.put(key, data, ttl_s)

    async def delete(self, key: str) -> bool:
        self._log.append((self.name, "delete"))
        return await self._inner.delete(key)

    async def exists(self, key: str) -> bool:
        self._log.append((self.name, "exists"))
        return await self._inner.exists(key)

    async def keys(self, prefix: str = "") -> list[str]:
        self._log.append((self.name, "keys"))
        return await self._inner.keys(prefix)


class DownTier:
    """A tier whose backing service is gone."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _fail(self) -> TierUnavailableError:
        return TierUnavailableError(f"{self.name} is down")

    async def get(self, key: str) -> bytes | None:
        raise self._fail()

    async def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        raise self._fail()

    async def delete(self, key: str) -> bool:
        raise self._fail()

    async def exists(self, key: str) -> bool:
        raise self._fail()

    async def keys(self, prefix: str = "") -> list[str]:
        raise self._fail()


def recording_store(
    tmp_path: Path, write_order: list[str] | None = None
) -> tuple[TieredStore, list[tuple[str, str]]]:
    log: list[tuple[str, str]] = []
    tiers: list[Tier] = [
        MemoryTier(1 << 20),
        MemoryTier(1 << 20, name="redis"),  # stands in for Redis: only the order matters here
        DiskTier(tmp_path),
    ]
    return TieredStore([RecordingTier(t, log) for t in tiers], write_order), log


async def test_a_hit_in_a_slow_tier_is_promoted_into_every_faster_tier(tmp_path: Path) -> None:
    memory, middle, disk = MemoryTier(1 << 20), MemoryTier(1 << 20, name="mid"), DiskTier(tmp_path)
    store = TieredStore([memory, middle, disk])
    await disk.put("k", b"only on disk")
    assert await memory.get("k") is None
    assert await store.get("k") == b"only on disk"
    assert await memory.get("k") == b"only on disk"
    assert await middle.get("k") == b"only on disk"


async def test_a_hit_in_the_fastest_tier_touches_nothing_else(tmp_path: Path) -> None:
    store, log = recording_store(tmp_path)
    await store.tier("memory").put("k", b"hot")
    log.clear()
    assert await store.get("k") == b"hot"
    assert log == [("memory", "get")]


async def test_writes_go_to_disk_first_then_redis_then_memory(tmp_path: Path) -> None:
    store, log = recording_store(tmp_path)
    await store.put("k", b"x")
    assert log == [("disk", "put"), ("redis", "put"), ("memory", "put")]


async def test_an_explicit_write_order_is_followed(tmp_path: Path) -> None:
    store, log = recording_store(tmp_path, write_order=["redis", "disk", "memory"])
    await store.put("k", b"x")
    assert [name for name, _ in log] == ["redis", "disk", "memory"]
    assert store.durable.name == "redis"


@pytest.mark.parametrize("order", [["disk", "redis"], ["disk", "disk", "redis"], ["x"]])
async def test_a_write_order_must_name_each_tier_once(tmp_path: Path, order: list[str]) -> None:
    with pytest.raises(ValueError, match="write_order"):
        recording_store(tmp_path, write_order=order)


def test_tier_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        TieredStore([MemoryTier(10), MemoryTier(10)])


async def test_tier_accessor(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    store = TieredStore([MemoryTier(10), disk])
    assert store.tier("disk") is disk
    assert [t.name for t in store.tiers] == ["memory", "disk"]
    with pytest.raises(KeyError):
        store.tier("redis")


async def test_delete_removes_everywhere_and_keys_is_the_union(tmp_path: Path) -> None:
    memory, disk = MemoryTier(1 << 20), DiskTier(tmp_path)
    store = TieredStore([memory, disk])
    await memory.put("only-memory", b"m")
    await disk.put("only-disk", b"d")
    await store.put("both", b"b")
    assert await store.keys() == ["both", "only-disk", "only-memory"]
    assert await store.exists("only-disk")
    assert await store.delete("only-memory") is True
    assert await store.delete("both") is True
    assert await memory.keys() == [] and await disk.keys() == ["only-disk"]
    assert await store.delete("both") is False


async def test_promoted_copies_get_the_promote_ttl(tmp_path: Path) -> None:
    now = [0.0]
    memory = MemoryTier(1 << 20, clock=lambda: now[0])
    disk = DiskTier(tmp_path)
    store = TieredStore([memory, disk], promote_ttl_s=5)
    await disk.put("k", b"x")
    await store.get("k")
    now[0] += 6
    assert await memory.get("k") is None


async def test_a_down_middle_tier_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    memory, disk = MemoryTier(1 << 20), DiskTier(tmp_path)
    store = TieredStore([memory, DownTier("redis"), disk])
    with caplog.at_level(logging.WARNING, logger="storage.tiered"):
        await store.put("k", b"x")
        await memory.delete("k")
        assert await store.get("k") == b"x"
        assert await store.exists("k")
        assert await store.keys() == ["k"]
        assert await store.delete("k") is True
    assert "'redis' skipped on put" in caplog.text
    assert "'redis' skipped on get" in caplog.text


async def test_a_down_durable_tier_fails_the_write_before_anything_is_written() -> None:
    memory = MemoryTier(1 << 20)
    store = TieredStore([memory, DownTier("disk")])
    with pytest.raises(TierUnavailableError):
        await store.put("k", b"x")
    assert await memory.keys() == []


async def test_a_down_last_tier_fails_a_read_that_missed_everywhere_else() -> None:
    store = TieredStore([MemoryTier(1 << 20), DownTier("disk")])
    with pytest.raises(TierUnavailableError):
        await store.get("k")


@pytest.mark.redis
async def test_promotion_through_real_redis(tmp_path: Path, redis_env: RedisEnv) -> None:
    memory, redis, disk = MemoryTier(1 << 20), redis_env.tier(), DiskTier(tmp_path)
    store = TieredStore([memory, redis, disk])
    await disk.put("k", b"z" * 2500)
    assert await store.get("k") == b"z" * 2500
    assert await memory.get("k") == b"z" * 2500
    assert await redis.get("k") == b"z" * 2500


@pytest.mark.redis
async def test_a_down_redis_still_serves_from_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(port=1, timeout_s=0.5)
    memory, disk = MemoryTier(1 << 20), DiskTier(tmp_path)
    store = TieredStore([memory, RedisTier(client, prefix="kvzip-test:down:"), disk])
    try:
        with caplog.at_level(logging.WARNING, logger="storage.tiered"):
            await store.put("k", b"from disk")
            fresh = TieredStore([MemoryTier(1 << 20), store.tier("redis"), DiskTier(tmp_path)])
            assert await fresh.get("k") == b"from disk"
            assert await fresh.tier("memory").get("k") == b"from disk"
    finally:
        await client.aclose()
    assert await disk.get("k") == b"from disk"
    assert "unreachable" in caplog.text


@pytest.mark.redis
async def test_build_store_orders_memory_redis_disk_and_every_redis_key_expires(
    tmp_path: Path, redis_env: RedisEnv
) -> None:
    store = build_store(
        1 << 20, tmp_path, redis_env.client, redis_prefix=redis_env.prefix, redis_ttl_s=60
    )
    assert [t.name for t in store.tiers] == ["memory", "redis", "disk"]
    assert store.durable.name == "disk"
    await store.put("written", b"w" * 100)
    await store.tier("disk").put("on-disk-only", b"d" * 100)
    assert await store.get("on-disk-only") == b"d" * 100  # promoted into Redis and memory
    keys = await redis_env.stored_keys()
    assert len(keys) == 4  # a part and a manifest per object
    ttls = [await redis_env.client.pttl(k) for k in keys]
    assert all(50_000 < t <= 60_000 for t in ttls), ttls


@pytest.mark.redis
async def test_a_flushed_redis_tier_is_refilled_from_disk(
    tmp_path: Path, redis_env: RedisEnv
) -> None:
    store = build_store(0, tmp_path, redis_env.client, redis_prefix=redis_env.prefix)
    await store.put("ctx", b"c" * 3000)
    await redis_env.client.unlink(*await redis_env.stored_keys())  # FLUSH of the cache tier
    assert await store.get("ctx") == b"c" * 3000
    assert await store.tier("redis").get("ctx") == b"c" * 3000


def flip_4k_in_the_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = bytes(b ^ 0xFF for b in raw[middle : middle + 4096])
    path.write_bytes(bytes(raw))


@pytest.mark.redis
async def test_a_damaged_disk_copy_is_served_from_redis_and_written_back(
    tmp_path: Path, redis_env: RedisEnv
) -> None:
    data = os.urandom(20_000)
    store = build_store(0, tmp_path, redis_env.client, redis_prefix=redis_env.prefix)
    await store.put("ctx.safetensors", data, ttl_s=3600)
    flip_4k_in_the_middle(tmp_path / "ctx.safetensors")
    assert await store.get_view("ctx.safetensors") == data  # the good Redis copy
    disk = store.tier("disk")
    assert isinstance(disk, DiskTier) and disk.corruptions == 1
    view = await disk.get_view("ctx.safetensors")  # written back, verified, same expiry
    assert isinstance(view, memoryview) and bytes(view) == data
    assert 3500 < disk._expires_at("ctx.safetensors") - time.time() <= 3600


@pytest.mark.redis
async def test_open_view_replaces_a_damaged_disk_copy_once_its_check_fails(
    tmp_path: Path, redis_env: RedisEnv
) -> None:
    """The disk map is handed out before its checksum; when that fails, `settled` gives
    the Redis copy instead (not the map), written back to disk; nothing is promoted from
    the damaged map."""
    data = os.urandom(20_000)
    store = build_store(0, tmp_path, redis_env.client, redis_prefix=redis_env.prefix)
    await store.put("ctx.safetensors", data, ttl_s=3600)
    flip_4k_in_the_middle(tmp_path / "ctx.safetensors")
    pending = await store.open_view("ctx.safetensors")
    assert pending is not None and isinstance(pending.data, memoryview)
    assert bytes(pending.data) != data  # the damaged bytes, readable before the check
    settled = await asyncio.wait_for(pending.settled, 10)
    assert settled is not pending.data and settled == data
    assert bytes(await store.tier("disk").get_view("ctx.safetensors") or b"") == data
    await store.settle()
    assert await store.tier("redis").get("ctx.safetensors") == data


async def test_open_view_of_a_memory_hit_is_settled_at_once(tmp_path: Path) -> None:
    store = TieredStore([MemoryTier(1 << 20), DiskTier(tmp_path)])
    await store.put("k", b"bytes")
    pending = await store.open_view("k")
    assert pending is not None and pending.settled.done() and pending.settled.result() == b"bytes"
    assert await store.open_view("missing") is None


async def test_a_damaged_disk_copy_and_no_other_one_is_a_miss(tmp_path: Path) -> None:
    store = TieredStore([MemoryTier(0), DiskTier(tmp_path)])
    await store.put("ctx.safetensors", os.urandom(10_000))
    flip_4k_in_the_middle(tmp_path / "ctx.safetensors")
    assert await store.get_view("ctx.safetensors") is None
    assert await store.get("ctx.safetensors") is None
    assert not await store.exists("ctx.safetensors")


async def test_get_skips_a_damaged_copy_to_the_next_tier(tmp_path: Path) -> None:
    near, far = DiskTier(tmp_path / "near", name="near"), DiskTier(tmp_path / "far", name="far")
    store = TieredStore([near, far])
    await store.put("k", b"k" * 9000)
    flip_4k_in_the_middle(tmp_path / "near" / "k")
    assert await store.get("k") == b"k" * 9000
    assert near.corruptions == 1 and await near.get("k") == b"k" * 9000  # promoted again


@pytest.mark.redis
async def test_a_corrupt_redis_part_is_dropped_and_served_from_disk(
    tmp_path: Path, redis_env: RedisEnv
) -> None:
    data = os.urandom(3000)
    store = TieredStore([MemoryTier(0), redis_env.tier(part_bytes=1000), DiskTier(tmp_path)])
    await store.put("ctx", data)
    redis = store.tier("redis")
    assert isinstance(redis, RedisTier)
    await redis_env.client.set(redis.part_key("ctx", 1), b"\xff" * 1000)
    assert await store.get("ctx") == data
    assert redis.evictions == 1  # the broken copy was removed...
    assert await redis.get("ctx") == data  # ...and a good one promoted from disk


class ShrinkingTier(RecordingTier):
    """A cache that takes any write but drops at once what exceeds its memory (what a
    Redis with maxmemory and allkeys-lru does with a blob larger than its memory)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.log: list[tuple[str, str]] = []
        super().__init__(MemoryTier(capacity_bytes, name="redis"), self.log)

    @property
    def puts(self) -> int:
        return self.log.count(("redis", "put"))


@pytest.mark.parametrize("read", ["get", "get_view"])
async def test_a_blob_the_cache_cannot_hold_is_not_rewritten_on_every_read(
    tmp_path: Path, read: str
) -> None:
    cache = ShrinkingTier(capacity_bytes=1000)
    store = TieredStore([MemoryTier(0), cache, DiskTier(tmp_path)])
    await store.tier("disk").put("big", b"b" * 5000)
    await store.tier("disk").put("small", b"s" * 500)
    for _ in range(3):
        assert await getattr(store, read)("big") == b"b" * 5000
        await store.settle()  # get_view copies into the cache in the background
    assert cache.puts == 1  # tried once, then remembered
    assert await getattr(store, read)("small") == b"s" * 500  # smaller objects still go
    await store.settle()
    assert cache.puts == 2 and await cache.get("small") == b"s" * 500


class BlockedTier(RecordingTier):
    """A shared cache whose writes wait until `release` is set."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        super().__init__(MemoryTier(1 << 20, name="redis"), log)
        self.release = asyncio.Event()

    async def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        await self.release.wait()
        await super().put(key, data, ttl_s)


async def test_a_read_from_disk_does_not_wait_for_the_copy_into_redis(tmp_path: Path) -> None:
    cache = BlockedTier([])
    store = TieredStore([MemoryTier(0), cache, DiskTier(tmp_path)])
    await store.tier("disk").put("ctx", b"c" * 5000)
    view = await asyncio.wait_for(store.get_view("ctx"), 5)  # returns while the copy waits
    assert view == b"c" * 5000 and not await cache.exists("ctx") and store.promoting == 1
    assert await asyncio.wait_for(store.get_view("ctx"), 5) == b"c" * 5000  # one copy at a time
    cache.release.set()
    await asyncio.wait_for(store.settle(), 5)
    assert await cache.get("ctx") == b"c" * 5000 and store.promoting == 0
    assert cache._log.count(("redis", "put")) == 1


async def test_a_delete_stops_the_background_copy_of_its_object(tmp_path: Path) -> None:
    cache = BlockedTier([])
    store = TieredStore([MemoryTier(0), cache, DiskTier(tmp_path)])
    await store.tier("disk").put("ctx", b"c" * 5000)
    assert await asyncio.wait_for(store.get_view("ctx"), 5) == b"c" * 5000
    assert store.promoting == 1
    assert await asyncio.wait_for(store.delete("ctx"), 5)
    cache.release.set()
    await asyncio.wait_for(store.settle(), 5)
    assert store.promoting == 0 and not await cache.exists("ctx")  # not written back
    assert await store.get("ctx") is None


@pytest.mark.redis
async def test_a_disk_view_is_copied_into_redis_intact(tmp_path: Path, redis_env: RedisEnv) -> None:
    data = os.urandom(5000)
    store = TieredStore([MemoryTier(0), redis_env.tier(part_bytes=1024), DiskTier(tmp_path)])
    await store.tier("disk").put("ctx", data)
    view = await store.get_view("ctx")
    assert isinstance(view, memoryview) and view == data  # the disk tier's memory map
    await asyncio.wait_for(store.settle(), 10)
    assert await store.tier("redis").get("ctx") == data  # 5 parts, checksums verified
