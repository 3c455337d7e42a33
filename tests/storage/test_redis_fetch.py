"""RedisTier reads: parts fetched in parallel into one buffer, each checked as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from storage import RedisTier, TierUnavailableError
from storage.redis_fetch import Endpoint, PartFetcher, windows
from tests.storage.storage_testing import RedisEnv

pytestmark = pytest.mark.redis

OBJECT = os.urandom(10_500)  # 11 parts of at most 1000 bytes, windows of 300 inside them


def tier(env: RedisEnv, workers: int) -> RedisTier:
    return RedisTier(
        env.client,
        prefix=env.prefix,
        part_bytes=1000,
        read_workers=workers,
        read_window_bytes=300,
        read_depth=2,
    )


async def test_parallel_and_serial_reads_give_the_stored_bytes(redis_env: RedisEnv) -> None:
    serial, parallel = tier(redis_env, 1), tier(redis_env, 3)
    await serial.put("ctx", OBJECT)
    for _ in range(3):  # the connections are reused
        assert await serial.get("ctx") == OBJECT
        assert await parallel.get("ctx") == OBJECT
    assert (parallel.hits, parallel.misses) == (3, 0)


async def test_get_into_fills_the_callers_buffer(redis_env: RedisEnv) -> None:
    reader = tier(redis_env, 2)
    await reader.put("ctx", OBJECT)
    staging = bytearray(len(OBJECT))
    asked: list[int] = []

    def allocate(size: int) -> memoryview:
        asked.append(size)
        return memoryview(staging)

    view = await reader.get_into("ctx", allocate)
    assert view is not None and view.obj is staging
    assert bytes(staging) == OBJECT and asked == [len(OBJECT)]


async def test_a_buffer_of_the_wrong_size_is_refused(redis_env: RedisEnv) -> None:
    reader = tier(redis_env, 2)
    await reader.put("ctx", OBJECT)
    with pytest.raises(ValueError, match="writable contiguous"):
        await reader.get_into("ctx", lambda size: memoryview(bytearray(size - 1)))
    with pytest.raises(ValueError, match="writable contiguous"):
        await reader.get_into("ctx", lambda size: memoryview(bytes(size)))


async def test_an_empty_object_round_trips(redis_env: RedisEnv) -> None:
    reader = tier(redis_env, 2)
    await reader.put("empty", b"")
    assert await reader.get("empty") == b""


@pytest.mark.parametrize("workers", [1, 3])
async def test_a_corrupt_part_is_refused_and_removed(redis_env: RedisEnv, workers: int) -> None:
    reader = tier(redis_env, workers)
    await reader.put("ctx", OBJECT)
    damaged = bytearray(OBJECT[7000:8000])
    damaged[999] ^= 0x01  # the last byte of the part's last window
    await redis_env.client.set(reader.part_key("ctx", 7), bytes(damaged))
    assert await reader.get("ctx") is None
    assert await redis_env.stored_keys() == []
    assert (reader.misses, reader.evictions) == (1, 1)


@pytest.mark.parametrize("workers", [1, 3])
async def test_a_missing_part_is_a_clean_miss(redis_env: RedisEnv, workers: int) -> None:
    reader = tier(redis_env, workers)
    await reader.put("ctx", OBJECT)
    await redis_env.client.unlink(reader.part_key("ctx", 10))
    assert await reader.get("ctx") is None
    assert await redis_env.stored_keys() == []
    await reader.put("ctx", OBJECT)  # the connections are in step again
    assert await reader.get("ctx") == OBJECT


async def test_a_part_of_another_type_is_a_miss(redis_env: RedisEnv) -> None:
    reader = tier(redis_env, 2)
    await reader.put("ctx", OBJECT)
    await redis_env.client.unlink(reader.part_key("ctx", 3))
    await redis_env.client.rpush(reader.part_key("ctx", 3), b"x")
    assert await reader.get("ctx") is None
    assert await redis_env.stored_keys() == []


async def test_a_manifest_with_an_empty_part_is_a_miss(redis_env: RedisEnv) -> None:
    reader = tier(redis_env, 2)
    await reader.put("ctx", b"abc")
    manifest = json.loads(await redis_env.client.get(reader.manifest_key("ctx")))
    empty = hashlib.sha256(b"").hexdigest()
    manifest |= {"part_count": 2, "sizes": [3, 0], "part_sha256": [manifest["sha256"], empty]}
    await redis_env.client.set(reader.manifest_key("ctx"), json.dumps(manifest))
    assert await reader.get("ctx") is None


def test_windows_tile_every_part() -> None:
    got = windows([1000, 250], 300)
    assert [[(w.start, w.stop, w.last) for w in part] for part in got] == [
        [(0, 300, False), (300, 600, False), (600, 900, False), (900, 1000, True)],
        [(0, 250, True)],
    ]
    assert {w.offset for w in got[1]} == {1000}


def test_the_endpoint_is_the_clients_own() -> None:
    client = Redis.from_url("rediss://ann:secret@cache.example:6380/3", socket_timeout=1.5)
    endpoint = Endpoint.of_client(client)
    assert (endpoint.host, endpoint.port, endpoint.db) == ("cache.example", 6380, 3)
    assert endpoint.credentials == ("ann", "secret") and endpoint.tls is not None
    assert endpoint.timeout_s == 1.5
    unix = Endpoint.of_client(Redis.from_url("unix:///run/redis.sock?db=2", password="pw"))
    assert (unix.path, unix.db, unix.credentials, unix.tls) == ("/run/redis.sock", 2, ("pw",), None)


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


async def test_a_server_that_stops_answering_fails_within_the_socket_timeout() -> None:
    with silent_server() as port:
        endpoint = Endpoint("127.0.0.1", port, None, 0, (), 0.3, 0.3, None)
        fetcher = PartFetcher(endpoint, workers=2, window_bytes=100, depth=2)
        start = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    fetcher.fetch(["a", "b"], [10, 10], ["0" * 64] * 2, memoryview(bytearray(20))),
                    timeout=5,
                )
        finally:
            fetcher.close()
        assert time.monotonic() - start < 2.0


async def test_an_unreachable_part_server_is_tier_unavailable(redis_env: RedisEnv) -> None:
    reader = tier(redis_env, 2)
    await reader.put("ctx", OBJECT)
    with silent_server() as port:
        reader._fetcher = PartFetcher(  # the manifest from Redis, the parts from nowhere
            Endpoint("127.0.0.1", port, None, 0, (), 0.3, 0.3, None), 2, 300, 2
        )
        try:
            with pytest.raises(TierUnavailableError):
                await reader.get("ctx")
        finally:
            reader.close()
    assert await redis_env.client.exists(reader.manifest_key("ctx"))  # not taken for broken
