"""One contract, every tier: memory, disk, redis, and a tiered store over all three."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from storage import DiskTier, InvalidKeyError, MemoryTier, Tier, TieredStore
from tests.storage.storage_testing import RedisEnv

TIER_KINDS = [
    pytest.param("memory", id="memory"),
    pytest.param("disk", id="disk"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("tiered", id="tiered", marks=pytest.mark.redis),
]
BAD_KEYS = ["", "../etc/passwd", "a/b", ".hidden", "-dash", "sp ace", "k" * 201, "é"]
PAYLOAD = bytes(range(256)) * 10  # 2560 bytes: three parts in the redis tier (part_bytes=1000)
TTL_S = 0.3


@pytest.fixture(params=TIER_KINDS)
def tier(request: pytest.FixtureRequest, tmp_path: Path, redis_env: RedisEnv) -> Tier:
    kind: str = request.param
    if kind == "memory":
        return MemoryTier(1 << 20)
    if kind == "disk":
        return DiskTier(tmp_path / "disk")
    if kind == "redis":
        return redis_env.tier()
    return TieredStore([MemoryTier(1 << 20), redis_env.tier(), DiskTier(tmp_path / "disk")])


async def test_put_then_get_returns_the_bytes(tier: Tier) -> None:
    await tier.put("ctx:abc", PAYLOAD)
    assert await tier.get("ctx:abc") == PAYLOAD


async def test_get_of_a_missing_key_is_none(tier: Tier) -> None:
    assert await tier.get("nothing-here") is None


async def test_empty_value_round_trips(tier: Tier) -> None:
    await tier.put("empty", b"")
    assert await tier.get("empty") == b""
    assert await tier.exists("empty")


@pytest.mark.parametrize("first, second", [(PAYLOAD, b"short"), (b"short", PAYLOAD * 2)])
async def test_put_replaces(tier: Tier, first: bytes, second: bytes) -> None:
    await tier.put("k", first)
    await tier.put("k", second)
    assert await tier.get("k") == second
    assert await tier.keys() == ["k"]


async def test_delete_removes_and_reports(tier: Tier) -> None:
    await tier.put("k", PAYLOAD)
    assert await tier.delete("k") is True
    assert await tier.get("k") is None
    assert not await tier.exists("k")
    assert await tier.delete("k") is False


async def test_exists(tier: Tier) -> None:
    assert not await tier.exists("k")
    await tier.put("k", b"x")
    assert await tier.exists("k")


async def test_keys_filters_by_prefix_and_sorts(tier: Tier) -> None:
    for key in ["b:2", "a:1", "b:1", "c", "b:3"]:
        await tier.put(key, key.encode())
    await tier.delete("b:3")
    assert await tier.keys() == ["a:1", "b:1", "b:2", "c"]
    assert await tier.keys("b:") == ["b:1", "b:2"]
    assert await tier.keys("zzz") == []


async def test_ttl_expiry_is_a_miss(tier: Tier) -> None:
    await tier.put("short", b"soon gone", ttl_s=TTL_S)
    await tier.put("long", b"stays")
    assert await tier.get("short") == b"soon gone"
    await asyncio.sleep(TTL_S + 0.3)
    assert await tier.get("short") is None
    assert not await tier.exists("short")
    assert await tier.keys() == ["long"]
    assert await tier.get("long") == b"stays"


async def test_put_without_ttl_clears_an_earlier_ttl(tier: Tier) -> None:
    await tier.put("k", b"old", ttl_s=TTL_S)
    await tier.put("k", b"new")
    await asyncio.sleep(TTL_S + 0.3)
    assert await tier.get("k") == b"new"


@pytest.mark.parametrize("ttl_s", [0.0, -1.0, float("nan"), float("inf")])
async def test_invalid_ttl_is_refused(tier: Tier, ttl_s: float) -> None:
    with pytest.raises(ValueError):
        await tier.put("k", b"x", ttl_s=ttl_s)


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_invalid_key_is_refused_by_every_method(tier: Tier, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        await tier.put(key, b"x")
    with pytest.raises(InvalidKeyError):
        await tier.get(key)
    with pytest.raises(InvalidKeyError):
        await tier.delete(key)
    with pytest.raises(InvalidKeyError):
        await tier.exists(key)
