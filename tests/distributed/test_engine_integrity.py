"""A worker with the real engine (tiny random Llama) over the shared tiers: a damaged disk copy
is served from Redis and written back; damaged everywhere, the context turns FAILED and
registers again; the stored bytes expire with the context (and follow an extension); a disk
eviction fails the context at once."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.errors import ContextLostError
from service.types import CreateContextRequest
from storage import DiskTier
from tests.distributed.test_engine_worker import COMPRESSION, QUESTION, TEXT, engine_cluster
from tests.storage.storage_testing import RedisEnv

pytestmark = pytest.mark.redis


def flip_4k_in_the_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = bytes(b ^ 0xFF for b in raw[middle : middle + 4096])
    path.write_bytes(bytes(raw))


def blob_file(data_dir: Path, cid: str) -> Path:
    return data_dir / "contexts" / f"{cid}.safetensors"


async def test_a_damaged_disk_copy_is_served_from_redis_and_restored(
    redis_env: RedisEnv, tiny_engine: object, tmp_path: Path
) -> None:
    cluster, executor = await engine_cluster(redis_env, tiny_engine, tmp_path, memory_bytes=0)
    try:
        async with cluster:
            await cluster.start_worker("gpu-0", executor)
            info, _ = await cluster.api.create_context(CreateContextRequest(TEXT, "m", COMPRESSION))
            before = await cluster.api.query(info.id, QUESTION)
            flip_4k_in_the_middle(blob_file(tmp_path, info.id))
            after = await cluster.api.query(info.id, QUESTION)
            assert after.answer == before.answer  # the good Redis copy answered
            disk = executor.store.durable
            assert isinstance(disk, DiskTier) and disk.corruptions == 1
            assert await disk.get_view(f"{info.id}.safetensors") is not None  # written back
            assert (await cluster.api.get_context(info.id)).state == "READY"
    finally:
        await executor.close()


async def test_a_context_damaged_everywhere_turns_failed_and_registers_again(
    redis_env: RedisEnv, tiny_engine: object, tmp_path: Path
) -> None:
    cluster, executor = await engine_cluster(redis_env, tiny_engine, tmp_path, memory_bytes=0)
    try:
        async with cluster:
            worker = await cluster.start_worker("gpu-0", executor)
            executor.registry.on_lost.append(worker.queries.mark_lost)  # as worker_main does
            request = CreateContextRequest(TEXT, "m", COMPRESSION)
            info, _ = await cluster.api.create_context(request)
            before = await cluster.api.query(info.id, QUESTION)
            flip_4k_in_the_middle(blob_file(tmp_path, info.id))
            parts = f"{redis_env.prefix}blob:{info.id}.safetensors:part:*"
            for key in [k async for k in redis_env.client.scan_iter(match=parts)]:
                await redis_env.client.set(key, b"\0" * 10)  # the Redis copy is broken too
            with pytest.raises(ContextLostError, match="no tier holds an intact copy"):
                await cluster.api.query(info.id, QUESTION)
            shown = await cluster.api.get_context(info.id)
            assert shown.state == "FAILED" and "lost its stored cache" in (shown.error or "")
            again, created = await cluster.api.create_context(request)
            assert created and again.id == info.id and again.state == "READY"
            assert (await cluster.api.query(info.id, QUESTION)).answer == before.answer
    finally:
        await executor.close()


async def test_the_stored_bytes_expire_with_the_context_and_follow_an_extension(
    redis_env: RedisEnv, tiny_engine: object, tmp_path: Path
) -> None:
    cluster, executor = await engine_cluster(redis_env, tiny_engine, tmp_path, memory_bytes=0)
    try:
        async with cluster:
            await cluster.start_worker("gpu-0", executor)
            request = CreateContextRequest(TEXT, "m", COMPRESSION, ttl_seconds=600)
            info, _ = await cluster.api.create_context(request)
            disk = executor.store.durable
            assert isinstance(disk, DiskTier)
            for key in (f"{info.id}.safetensors", f"{info.id}.json"):
                expires_at = disk._expires_at(key)
                assert expires_at is not None and abs(expires_at - time.time() - 600) < 30
            later = datetime.now(UTC) + timedelta(hours=5)
            await cluster.api.update_context(info.id, later)  # the API never sees the disk
            await cluster.api.query(info.id, QUESTION)  # the worker keeps the bytes as long
            expires_at = disk._expires_at(f"{info.id}.safetensors")
            assert expires_at is not None and abs(expires_at - later.timestamp()) < 30
    finally:
        await executor.close()


async def test_a_disk_eviction_fails_the_context_at_once(
    redis_env: RedisEnv, tiny_engine: object, tmp_path: Path
) -> None:
    cluster, executor = await engine_cluster(redis_env, tiny_engine, tmp_path, memory_bytes=0)
    try:
        async with cluster:
            worker = await cluster.start_worker("gpu-0", executor)
            executor.registry.on_lost.append(worker.queries.mark_lost)  # as worker_main does
            first, _ = await cluster.api.create_context(
                CreateContextRequest(TEXT, "m", COMPRESSION)
            )
            disk = executor.store.durable
            assert isinstance(disk, DiskTier)
            disk.capacity_bytes = (
                disk.bytes_used + blob_file(tmp_path, first.id).stat().st_size // 2
            )
            second, _ = await cluster.api.create_context(
                CreateContextRequest(TEXT + " more", "m", COMPRESSION)
            )
            shown = await cluster.api.get_context(first.id)
            assert shown.state == "FAILED" and "evicted from the disk tier" in (shown.error or "")
            blobs = [k async for k in redis_env.client.scan_iter(match=f"{redis_env.prefix}blob:*")]
            assert blobs and all(second.id.encode() in k for k in blobs)  # gone from Redis too
            with pytest.raises(ContextLostError):
                await cluster.api.query(first.id, QUESTION)
            assert (await cluster.api.get_context(second.id)).state == "READY"
    finally:
        await executor.close()
