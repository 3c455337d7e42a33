"""Durability in distributed mode on a real Redis (each test on its own prefix; "losing
Redis" unlinks that prefix's keys, never anything else): a READY context whose records
Redis lost is rebuilt from the object on the shared disk, on a lookup and by a worker's
scan at start; tenants stay apart; deleted and expired contexts stay gone; a purge reaches
every worker's memory. And a worker's failure reaches the tenant without its internals."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.config import CompressionConfig
from service.errors import ContextNotFoundError
from service.serving.distributed.executor import EngineExecutor, build_shared_store
from service.types import ANY_TENANT, CreateContextRequest, QueryRequest, SamplingParams
from storage import redis_client
from tests.distributed.distributed_testing import REDIS_URL, Cluster, FakeExecutor
from tests.distributed.test_engine_worker import engine_cluster
from tests.storage.storage_testing import RedisEnv

pytestmark = pytest.mark.redis

TEXT = "The museum opens at nine. Tickets cost twelve euros. The cafe closes at five. " * 6
COMPRESSION = CompressionConfig("kvzip", 0.3, 64)
SAMPLING = SamplingParams(max_new_tokens=6)


def register(tenant: str = "team-a", text: str = TEXT, **fields: object) -> CreateContextRequest:
    return CreateContextRequest(text, "museum", COMPRESSION, tenant, **fields)  # type: ignore[arg-type]


def question(tenant: str = "team-a") -> QueryRequest:
    return QueryRequest("When does the museum open?", SAMPLING, tenant=tenant)


async def lose(env: RedisEnv, *patterns: str) -> None:
    """Unlink the test prefix's keys that match `patterns` (all of them by default)."""
    found = set()
    for pattern in patterns or ("*",):
        found |= {k async for k in env.client.scan_iter(match=f"{env.prefix}{pattern}")}
    if found:
        await env.client.unlink(*found)


async def test_a_ready_context_survives_the_loss_of_redis(
    redis_env: RedisEnv, tiny_engine: object, tmp_path: Path
) -> None:
    cluster, executor = await engine_cluster(redis_env, tiny_engine, tmp_path, 1 << 26)
    try:
        async with cluster:
            await cluster.start_worker("gpu-0", executor)
            info, _ = await cluster.api.create_context(register())
            before = await cluster.api.query(info.id, question())

            await lose(redis_env, "ctx:*", "index*", "expiry")  # the records: a lookup asks
            with pytest.raises(ContextNotFoundError):
                await cluster.api.get_context(info.id, "team-b")
            assert await cluster.api.get_context(info.id, "team-a") == info
            assert (await cluster.api.query(info.id, question())).answer == before.answer
            assert ("RESTORED", info.id) in await cluster.events()

            await lose(redis_env)  # everything: streams, heartbeats, the Redis tier
            assert await cluster.api.get_context(info.id, "team-a") == info
            assert (await cluster.api.query(info.id, question())).answer == before.answer
            with pytest.raises(ContextNotFoundError):
                await cluster.api.query(info.id, question("team-b"))
    finally:
        await executor.close()


async def test_a_restarted_worker_rebuilds_the_records_redis_lost(
    redis_env: RedisEnv, tiny_engine: object, tmp_path: Path
) -> None:
    cluster, executor = await engine_cluster(redis_env, tiny_engine, tmp_path, 1 << 26)
    try:
        async with cluster:
            await cluster.start_worker("gpu-0", executor)
            ours, _ = await cluster.api.create_context(register())
            theirs, _ = await cluster.api.create_context(register("team-b", TEXT + " Bye."))
            before = await cluster.api.query(ours.id, question())
            await cluster.stop_worker("gpu-0")
            await executor.close()
            await lose(redis_env)

            client = redis_client(REDIS_URL, timeout_s=5.0, retries=0)
            cluster._clients.append(client)
            store = build_shared_store(cluster.config, client)
            executor = EngineExecutor(cluster.config, tiny_engine, store)  # type: ignore[arg-type]
            await cluster.start_worker("gpu-1", executor)

            async def listed() -> bool:  # no lookup: only the scan can bring them back
                page = await cluster.api.list_contexts(ANY_TENANT)
                return {c.id for c in page.contexts} == {ours.id, theirs.id}

            await cluster.until(listed)
            assert [c.id for c in (await cluster.api.list_contexts("team-a")).contexts] == [
                ours.id
            ]
            assert await cluster.api.get_context(ours.id, "team-a") == ours
            assert (await cluster.api.query(ours.id, question())).answer == before.answer
            with pytest.raises(ContextNotFoundError):
                await cluster.api.get_context(theirs.id, "team-a")
    finally:
        await executor.close()


async def test_deleted_and_expired_contexts_are_not_restored(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        executor = FakeExecutor()
        worker = await cluster.start_worker("w1", executor)
        deleted, _ = await cluster.api.create_context(register(text="deleted"))
        short, _ = await cluster.api.create_context(register(text="short", ttl_seconds=0.3))
        await cluster.api.delete_context(deleted.id, "team-a")
        assert deleted.id in executor.stored  # its bytes wait for the sweep
        with pytest.raises(ContextNotFoundError):
            await cluster.api.get_context(deleted.id, "team-a")
        await asyncio.sleep(0.35)
        await lose(redis_env, "ctx:*", "index*", "expiry")  # the expiry set too
        with pytest.raises(ContextNotFoundError):
            await cluster.api.get_context(short.id, "team-a")  # expired as registered
        assert await worker.housekeeping.sweep() == 1 and executor.purged == [short.id]


async def test_a_delete_clears_every_workers_memory(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        first, second = FakeExecutor(), FakeExecutor()
        await cluster.start_worker("w1", first)
        await cluster.start_worker("w2", second)
        info, _ = await cluster.api.create_context(register())
        await cluster.api.delete_context(info.id, "team-a")

        async def forgotten() -> bool:
            return first.forgotten == second.forgotten == [info.id]

        await cluster.until(forgotten, timeout_s=5.0)
        short, _ = await cluster.api.create_context(register(text="short", ttl_seconds=0.2))
        await asyncio.sleep(0.25)
        assert await cluster.running["w1"].worker.housekeeping.sweep() == 2  # and the deleted

        async def swept() -> bool:  # the expiry sweep of one worker tells the other too
            return short.id in first.forgotten and short.id in second.forgotten

        await cluster.until(swept, timeout_s=5.0)


async def test_a_purge_drops_the_resident_copy_of_a_real_worker(
    redis_env: RedisEnv, tiny_engine: object, tmp_path: Path
) -> None:
    cluster, executor = await engine_cluster(redis_env, tiny_engine, tmp_path, 1 << 26)
    try:
        async with cluster:
            await cluster.start_worker("gpu-0", executor)
            info, _ = await cluster.api.create_context(register())
            await cluster.api.query(info.id, question())
            assert executor.resident.get(info.id) is not None
            await cluster.api.delete_context(info.id, "team-a")

            async def dropped() -> bool:
                return executor.resident.get(info.id) is None

            await cluster.until(dropped, timeout_s=5.0)
    finally:
        await executor.close()



class BrokenAnswers(FakeExecutor):
    """Ingests fine; fails every answer with an error full of internals."""

    async def answer(self, job, expire_time=None):  # type: ignore[no-untyped-def,override]
        raise RuntimeError("cannot map /srv/models/weights.bin: out of host memory")
        yield  # pragma: no cover (an async generator)


async def test_a_worker_failure_reaches_the_tenant_without_internals(redis_env: RedisEnv) -> None:
    from service.errors import EngineUnavailableError

    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", BrokenAnswers())
        info, _ = await cluster.api.create_context(register())
        with pytest.raises(EngineUnavailableError) as failed:
            await cluster.api.query(info.id, question())
        assert str(failed.value) == (
            "internal error while answering (RuntimeError); details are in the server log"
        )
