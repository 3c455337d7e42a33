"""The distributed mode's storage budget (fake executor, real Redis): per-tenant quotas counted
over the Redis records (one count for every API process), documents kept out of the job
streams, and a context whose stored cache is lost: FAILED (410), then registered again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest

from service.errors import (
    ContextLostError,
    EngineUnavailableError,
    StorageQuotaExceededError,
    TooManyContextsError,
)
from service.serving.distributed.jobs import INGEST, QueryJob
from service.serving.distributed.remote import RemoteContextService
from service.types import CreateContextRequest, QueryEvent, QueryRequest
from tests.distributed.distributed_testing import Cluster, FakeExecutor, bounded
from tests.storage.storage_testing import RedisEnv

pytestmark = pytest.mark.redis

DOC = "The pass key is 48213. Remember it. " * 20


def register(text: str = DOC, tenant: str = "acme", **kwargs: object) -> CreateContextRequest:
    return CreateContextRequest(text=text, tenant=tenant, **kwargs)  # type: ignore[arg-type]


def with_quota(cluster: Cluster, **quota: object) -> None:
    cluster.config = replace(cluster.config, **quota)  # type: ignore[arg-type]
    cluster.api.config = cluster.config


async def test_the_quota_of_contexts_is_one_count_across_api_processes(
    redis_env: RedisEnv,
) -> None:
    async with Cluster(redis_env) as cluster:
        with_quota(cluster, tenant_max_contexts=2)
        other = RemoteContextService(cluster.config)  # a second API process
        await other.start()
        try:
            await cluster.start_worker("w1", FakeExecutor())
            await other.refresh()
            apis = [cluster.api, other] * 3
            outcomes = await asyncio.gather(
                *(api.create_context(register(f"{DOC} {i}")) for i, api in enumerate(apis)),
                return_exceptions=True,
            )
            made = [o for o in outcomes if isinstance(o, tuple)]
            refused = [o for o in outcomes if isinstance(o, TooManyContextsError)]
            assert (len(made), len(refused)) == (2, 4), outcomes
            assert "KVZIP_TENANT_MAX_CONTEXTS=2" in str(refused[0])
            first = next(i for i, o in enumerate(outcomes) if isinstance(o, tuple))
            again, created = await other.create_context(register(f"{DOC} {first}"))
            assert (again.id, created) == (made[0][0].id, False)  # known: never refused
            await cluster.api.create_context(register(tenant="other"))  # per tenant
            await cluster.api.delete_context(made[0][0].id, "acme")
            _, created = await other.create_context(register(f"{DOC} new"))
            assert created
        finally:
            await bounded(other.close, "closing the second API")


async def test_the_quota_of_bytes_is_checked_over_the_ready_records(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        with_quota(cluster, tenant_max_bytes=1)
        await cluster.start_worker("w1", FakeExecutor())
        info, _ = await cluster.api.create_context(register())
        with pytest.raises(StorageQuotaExceededError, match=f"take {info.compression.bytes} "):
            await cluster.api.create_context(register(DOC + " more"))
        await cluster.api.create_context(register(DOC + " more", tenant="other"))


async def test_an_ingest_document_lives_outside_the_job_stream(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        executor = FakeExecutor(gate=asyncio.Event())
        await cluster.start_worker("w1", executor)
        info, _ = await cluster.api.create_context(register(wait=False, ttl_seconds=600))
        await cluster.until(lambda: _true(len(executor.ingested) == 1))
        [(_, fields)] = await redis_env.client.xrange(cluster.keys.stream(INGEST))
        assert DOC.encode() not in b"".join(fields.values())  # only the document's key
        doc_key = fields[b"doc"].decode()
        assert await redis_env.client.get(doc_key) == DOC.encode()
        assert 590_000 < await redis_env.client.pttl(doc_key) <= 600_000  # the context's life
        assert executor.texts == [DOC]
        assert executor.gate is not None
        executor.gate.set()
        await cluster.until(lambda: _gone(redis_env, doc_key))  # acknowledged: deleted
        record = await cluster.api.records.get(info.id)
        assert record is not None and record.state == "READY"
        assert executor.expiries == [record.record.expire_time]  # the bytes expire with it


async def test_an_ingest_whose_document_is_gone_fails_with_why(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        await cluster.stop_worker("w1")  # seen a moment ago: the API still takes the job
        info, _ = await cluster.api.create_context(register(wait=False))
        [(_, fields)] = await redis_env.client.xrange(cluster.keys.stream(INGEST))
        await redis_env.client.unlink(fields[b"doc"].decode())  # lost by Redis meanwhile
        executor = FakeExecutor()
        await cluster.start_worker("w2", executor)
        record = await cluster.api.records.wait_settled(info.id, 10.0)
        assert record.state == "FAILED" and executor.ingested == []
        assert record.failure is not None
        assert record.failure["type"] == EngineUnavailableError.__name__
        assert "register it again" in (record.record.error or "")


@dataclass
class LosingExecutor(FakeExecutor):
    """Answers once it has been told the bytes are there again (`lost` cleared)."""

    lost: bool = True

    async def answer(  # type: ignore[override]
        self, job: QueryJob, expire_time: str | None = None
    ) -> AsyncIterator[QueryEvent]:
        if self.lost:
            raise ContextLostError(job.context_id, "no tier holds an intact copy any more")
        async for event in super().answer(job, expire_time):
            yield event


async def test_a_lost_context_answers_410_until_registered_again(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        executor = LosingExecutor()
        await cluster.start_worker("w1", executor)
        info, _ = await cluster.api.create_context(register())
        question = QueryRequest("Key?", tenant="acme")
        with pytest.raises(ContextLostError, match="no tier holds an intact copy"):
            await cluster.api.query(info.id, question)
        shown = await cluster.api.get_context(info.id, "acme")
        assert shown.state == "FAILED" and "register the same document again" in (shown.error or "")
        answered = len(executor.answered)
        with pytest.raises(ContextLostError):  # refused by the API: no job, no worker
            await cluster.api.query(info.id, question)
        assert len(executor.answered) == answered
        executor.lost = False
        again, created = await cluster.api.create_context(register())
        assert created and again.id == info.id and again.state == "READY"
        assert executor.ingested == [info.id, info.id]
        assert (await cluster.api.query(info.id, question)).answer.endswith("48213")


async def _true(value: bool) -> bool:
    return value


async def _gone(env: RedisEnv, key: str) -> bool:
    return not await env.client.exists(key)


async def test_one_sweep_purges_every_due_context_not_only_a_hundred(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        records = cluster.api.records
        for i in range(250):  # deleted contexts whose bytes wait for the sweep
            await records.schedule_purge(f"ctx_{i:032x}")
        purged: list[str] = []

        async def purge(cid: str) -> None:
            purged.append(cid)

        assert await records.sweep(purge) == 250
        assert len(set(purged)) == 250 and await records.due(float("inf")) == []
