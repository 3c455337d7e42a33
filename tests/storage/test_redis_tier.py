"""RedisTier: chunking, manifest last, broken objects are misses, TTL everywhere, fail fast."""

from __future__ import annotations

import json
import time

import pytest
from redis.asyncio import Redis

from storage import Manifest, RedisTier, TierUnavailableError
from tests.storage.storage_testing import RedisEnv, make_client

pytestmark = pytest.mark.redis

OBJECT = bytes(i % 251 for i in range(3500))  # 3500 bytes: 4 parts of at most 1000


async def test_an_object_is_split_into_parts_plus_a_manifest(redis_env: RedisEnv) -> None:
    tier = redis_env.tier(part_bytes=1000)
    await tier.put("ctx", OBJECT)
    parts = [tier.part_key("ctx", i) for i in range(4)]
    assert await redis_env.stored_keys() == sorted([*parts, tier.manifest_key("ctx")])
    manifest = json.loads(await redis_env.client.get(tier.manifest_key("ctx")))
    assert manifest["format_version"] == 1
    assert manifest["part_count"] == 4
    assert manifest["sizes"] == [1000, 1000, 1000, 500]
    assert len(manifest["part_sha256"]) == 4
    assert manifest["total_bytes"] == 3500
    assert await redis_env.client.get(parts[3]) == OBJECT[3000:]
    assert await tier.get("ctx") == OBJECT


async def test_the_manifest_is_written_after_every_part(
    redis_env: RedisEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = redis_env.tier(part_bytes=1000)
    client = redis_env.client
    original_set = client.set
    parts_present_at_manifest_write: list[int] = []

    async def spying_set(name: str, value: bytes, **kwargs: object) -> object:
        if name == tier.manifest_key("ctx"):
            keys = [tier.part_key("ctx", i) for i in range(4)]
            parts_present_at_manifest_write.append(await client.exists(*keys))
        return await original_set(name, value, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client, "set", spying_set)
    await tier.put("ctx", OBJECT)
    assert parts_present_at_manifest_write == [4]


async def test_a_missing_part_is_a_miss_and_the_remnants_are_unlinked(
    redis_env: RedisEnv,
) -> None:
    tier = redis_env.tier(part_bytes=1000)
    await tier.put("ctx", OBJECT)
    await redis_env.client.unlink(tier.part_key("ctx", 2))
    assert not await tier.exists("ctx")
    assert await tier.get("ctx") is None
    assert await redis_env.stored_keys() == []
    assert (tier.misses, tier.evictions) == (1, 1)


async def test_a_corrupted_part_is_a_miss(redis_env: RedisEnv) -> None:
    tier = redis_env.tier(part_bytes=1000)
    await tier.put("ctx", OBJECT)
    damaged = bytearray(OBJECT[1000:2000])
    damaged[17] ^= 0xFF
    await redis_env.client.set(tier.part_key("ctx", 1), bytes(damaged))
    assert await tier.get("ctx") is None
    assert await redis_env.stored_keys() == []


async def test_a_part_failing_its_own_checksum_is_a_miss(redis_env: RedisEnv) -> None:
    tier = redis_env.tier(part_bytes=1000)
    await tier.put("ctx", OBJECT)
    manifest = json.loads(await redis_env.client.get(tier.manifest_key("ctx")))
    manifest["part_sha256"][2] = "0" * 64
    await redis_env.client.set(tier.manifest_key("ctx"), json.dumps(manifest))
    assert await tier.get("ctx") is None
    assert await redis_env.stored_keys() == []


async def test_parts_are_at_most_32_mib_by_default(redis_env: RedisEnv) -> None:
    tier = RedisTier(redis_env.client, prefix=redis_env.prefix)
    big = b"\x01" * (32 * 1024 * 1024 + 5)
    await tier.put("big", big)
    manifest = json.loads(await redis_env.client.get(tier.manifest_key("big")))
    assert manifest["sizes"] == [32 * 1024 * 1024, 5]
    assert await tier.get("big") == big


async def test_a_truncated_part_is_a_miss(redis_env: RedisEnv) -> None:
    tier = redis_env.tier(part_bytes=1000)
    await tier.put("ctx", OBJECT)
    await redis_env.client.set(tier.part_key("ctx", 3), OBJECT[3000:3100])
    assert await tier.get("ctx") is None


async def test_an_unreadable_manifest_is_a_miss_and_removed(redis_env: RedisEnv) -> None:
    tier = redis_env.tier(part_bytes=1000)
    await tier.put("ctx", OBJECT)
    await redis_env.client.set(tier.manifest_key("ctx"), b"{not json")
    assert await tier.get("ctx") is None
    assert tier.manifest_key("ctx") not in await redis_env.stored_keys()


async def test_a_manifest_replaced_meanwhile_is_not_removed(redis_env: RedisEnv) -> None:
    tier = redis_env.tier(part_bytes=1000)
    await tier.put("ctx", OBJECT)
    await tier._discard("ctx", b"some older manifest", 4)  # what a racing reader would do
    assert await tier.get("ctx") == OBJECT


async def test_a_smaller_replacement_drops_the_surplus_parts(redis_env: RedisEnv) -> None:
    tier = redis_env.tier(part_bytes=1000)
    await tier.put("ctx", OBJECT)
    await tier.put("ctx", b"x" * 1500)
    assert await redis_env.stored_keys() == sorted(
        [tier.part_key("ctx", 0), tier.part_key("ctx", 1), tier.manifest_key("ctx")]
    )


async def all_pttls(redis_env: RedisEnv) -> list[int]:
    return [await redis_env.client.pttl(k) for k in await redis_env.stored_keys()]


async def test_every_key_carries_the_ttl(redis_env: RedisEnv) -> None:
    tier = redis_env.tier(part_bytes=1000)
    await tier.put("ctx", OBJECT, ttl_s=60)
    ttls = await all_pttls(redis_env)
    assert len(ttls) == 5
    assert all(50_000 < t <= 60_000 for t in ttls)


async def test_the_default_ttl_applies_when_none_is_given(redis_env: RedisEnv) -> None:
    tier = redis_env.tier(part_bytes=1000, default_ttl_s=30)
    await tier.put("ctx", OBJECT)
    assert all(20_000 < t <= 30_000 for t in await all_pttls(redis_env))


async def test_the_default_ttl_bounds_a_longer_one_given(redis_env: RedisEnv) -> None:
    tier = redis_env.tier(part_bytes=1000, default_ttl_s=30)
    await tier.put("ctx", OBJECT, ttl_s=3600)  # a context's lifetime: the cache keeps less
    assert all(20_000 < t <= 30_000 for t in await all_pttls(redis_env))
    await tier.put("ctx", OBJECT, ttl_s=10)  # a shorter one wins
    assert all(0 < t <= 10_000 for t in await all_pttls(redis_env))


async def test_without_any_ttl_keys_do_not_expire(redis_env: RedisEnv) -> None:
    tier = redis_env.tier(part_bytes=1000)
    await tier.put("ctx", OBJECT)
    assert set(await all_pttls(redis_env)) == {-1}


async def test_a_glob_character_in_the_prefix_is_escaped_by_keys(redis_env: RedisEnv) -> None:
    plain = redis_env.tier()
    odd = RedisTier(redis_env.client, prefix=f"{redis_env.prefix}[x]*?:")
    await plain.put("p", b"plain")
    await odd.put("q", b"odd")
    try:
        assert await odd.keys() == ["q"]
        assert await plain.keys() == ["p"]
    finally:
        await odd.delete("q")


async def test_unreachable_redis_raises_tier_unavailable_quickly() -> None:
    client = make_client(port=1, timeout_s=0.5)
    tier = RedisTier(client, prefix="kvzip-test:unreachable:")
    start = time.monotonic()
    try:
        for call in (
            lambda: tier.get("k"),
            lambda: tier.put("k", b"x"),
            lambda: tier.delete("k"),
            lambda: tier.exists("k"),
            lambda: tier.keys(),
        ):
            with pytest.raises(TierUnavailableError, match="unreachable"):
                await call()
    finally:
        await client.aclose()
    assert time.monotonic() - start < 2.0


async def test_a_decoding_client_is_refused() -> None:
    client = Redis(host="127.0.0.1", port=6379, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisTier(client)
    finally:
        await client.aclose()


def test_manifest_round_trips_and_rejects_other_versions() -> None:
    data = b"abcdef"
    view = memoryview(data)
    manifest = Manifest.of_parts([view[:4], view[4:]], data)
    assert Manifest.decode(manifest.encode()) == manifest
    assert manifest.sizes == [4, 2] and manifest.total_bytes == 6
    other = json.loads(manifest.encode()) | {"format_version": 2}
    assert Manifest.decode(json.dumps(other).encode()) is None
    assert Manifest.decode(b"[1, 2]") is None
