"""A worker with the real engine (tiny random Llama), in this process: the answers are the
embedded service's own, and a flushed Redis tier is refilled from the shared disk."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from service.config import CompressionConfig, EngineConfig
from service.serving.distributed.executor import EngineExecutor, build_shared_store
from service.serving.embedded import build_embedded_service
from service.types import CreateContextRequest, QueryRequest, SamplingParams
from storage import redis_client
from tests.distributed.distributed_testing import REDIS_URL, Cluster
from tests.storage.storage_testing import RedisEnv

pytestmark = pytest.mark.redis

TEXT = "The museum opens at nine. Tickets cost twelve euros. The cafe closes at five. " * 6
COMPRESSION = CompressionConfig("kvzip", 0.3, 64)
QUESTION = QueryRequest("When does the museum open?", SamplingParams(max_new_tokens=6))


async def engine_cluster(
    redis_env: RedisEnv, tiny_engine: object, data_dir: Path, memory_bytes: int
) -> tuple[Cluster, EngineExecutor]:
    cluster = Cluster(redis_env)
    cluster.config = replace(
        cluster.config,
        engine=EngineConfig(model="tiny"),
        data_dir=data_dir,
        memory_cache_bytes=memory_bytes,
    )
    client = redis_client(REDIS_URL, timeout_s=5.0, retries=0)
    cluster._clients.append(client)
    executor = EngineExecutor(
        cluster.config,
        tiny_engine,
        build_shared_store(cluster.config, client),  # type: ignore[arg-type]
    )
    await executor.start()
    return cluster, executor


async def test_answers_match_the_embedded_service(
    redis_env: RedisEnv, tiny_engine: object, tmp_path: Path
) -> None:
    cluster, executor = await engine_cluster(redis_env, tiny_engine, tmp_path / "shared", 1 << 26)
    try:
        async with cluster:
            await cluster.start_worker("gpu-0", executor)
            info, created = await cluster.api.create_context(
                CreateContextRequest(TEXT, "museum", COMPRESSION)
            )
            assert created and info.state == "READY"
            distributed = await cluster.api.query(info.id, QUESTION)
            streamed = [e async for e in cluster.api.stream_query(info.id, QUESTION)]
    finally:
        await executor.close()
    embedded = build_embedded_service(
        replace(cluster.config, data_dir=tmp_path / "embedded"),
        engine=tiny_engine,  # type: ignore[arg-type]
    )
    await embedded.start()
    try:
        local, _ = await embedded.create_context(CreateContextRequest(TEXT, "m", COMPRESSION))
        expected = await embedded.query(local.id, QUESTION)
    finally:
        await embedded.close()
    assert info.id == local.id  # one context id in both modes
    assert info.context_tokens == local.context_tokens
    same = ("method", "ratio", "kept_kv_pairs", "total_kv_pairs")  # bytes: metadata may differ
    assert [getattr(info.compression, f) for f in same] == [
        getattr(local.compression, f) for f in same
    ]
    assert distributed.answer == expected.answer
    assert (distributed.prompt_tokens, distributed.completion_tokens) == (
        expected.prompt_tokens,
        expected.completion_tokens,
    )
    assert "".join(e.delta for e in streamed) == expected.answer
    assert streamed[-1].result is not None


async def test_a_flushed_cache_tier_still_answers_from_disk_and_refills(
    redis_env: RedisEnv, tiny_engine: object, tmp_path: Path
) -> None:
    cluster, executor = await engine_cluster(redis_env, tiny_engine, tmp_path, memory_bytes=0)
    try:
        async with cluster:
            await cluster.start_worker("gpu-0", executor)
            info, _ = await cluster.api.create_context(CreateContextRequest(TEXT, "m", COMPRESSION))
            record = await cluster.api.records.get(info.id)
            assert record is not None and record.tiers == ("redis", "disk")
            before = await cluster.api.query(info.id, QUESTION)
            blobs = [k async for k in redis_env.client.scan_iter(match=f"{redis_env.prefix}blob:*")]
            assert blobs
            await redis_env.client.unlink(*blobs)  # FLUSH of the cache tier
            after = await cluster.api.query(info.id, QUESTION)
            assert after.answer == before.answer
            refilled = [
                k async for k in redis_env.client.scan_iter(match=f"{redis_env.prefix}blob:*")
            ]
            assert sorted(refilled) == sorted(blobs)  # promoted back from disk
            assert all([await redis_env.client.pttl(k) > 0 for k in refilled])  # TTL on each
    finally:
        await executor.close()
