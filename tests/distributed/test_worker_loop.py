"""The distributed mode without a model: RemoteContextService + StreamWorkers (fake executor)
on a real Redis: records, idempotence, progress, streaming, crashes, dead letters, expiry."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from service.errors import (
    ContextNotFoundError,
    ContextNotReadyError,
    DocumentTooLongError,
    EngineUnavailableError,
    InvalidInputError,
    QueueFullError,
)
from service.serving.distributed.jobs import INGEST, IngestJob, decode_job
from service.serving.distributed.keys import GROUP
from service.types import ANY_TENANT, CreateContextRequest, QueryRequest
from tests.distributed.distributed_testing import Cluster, FakeExecutor
from tests.storage.storage_testing import RedisEnv

pytestmark = pytest.mark.redis

DOC = "The pass key is 48213. Remember it. " * 20


def register(text: str = DOC, **kwargs: object) -> CreateContextRequest:
    return CreateContextRequest(text=text, **kwargs)  # type: ignore[arg-type]


async def test_a_registration_becomes_ready_once_with_its_stats(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        executor = FakeExecutor()
        await cluster.start_worker("w1", executor)
        info, created = await cluster.api.create_context(register(display_name="doc"))
        assert created and info.state == "READY" and info.progress == 1.0
        assert info.id.startswith("ctx_") and len(info.id) == 36
        assert (info.display_name, info.model) == ("doc", "fake-model")
        assert info.context_tokens == len(DOC.split())
        assert info.compression.kept_kv_pairs == info.context_tokens
        assert info.expire_time is not None
        again, created_again = await cluster.api.create_context(register())
        assert (again.id, created_again) == (info.id, False)
        assert executor.ingested == [info.id]
        assert await cluster.events() == [("READY", info.id)]
        stored = await cluster.api.records.get(info.id)
        assert stored is not None and stored.tiers == ("disk", "redis") and stored.worker == "w1"
        assert await redis_env.client.xlen(cluster.keys.stream(INGEST)) == 0  # acknowledged


async def test_concurrent_registrations_of_one_document_ingest_it_once(
    redis_env: RedisEnv,
) -> None:
    async with Cluster(redis_env) as cluster:
        executor = FakeExecutor()
        await cluster.start_worker("w1", executor)
        await cluster.start_worker("w2", executor)
        results = await asyncio.gather(*(cluster.api.create_context(register()) for _ in range(8)))
        assert len({info.id for info, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        assert len(executor.ingested) == 1
        assert [event for event, _ in await cluster.events()] == ["READY"]


async def test_ids_depend_on_settings_tenant_and_system(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        plain, _ = await cluster.api.create_context(register(wait=False))
        other_tenant, _ = await cluster.api.create_context(register(tenant="acme", wait=False))
        with_system, _ = await cluster.api.create_context(register(system="Be brief.", wait=False))
        assert len({plain.id, other_tenant.id, with_system.id}) == 3
        with pytest.raises(ContextNotFoundError):
            await cluster.api.get_context(other_tenant.id)  # another tenant's id is a 404
        assert (await cluster.api.get_context(other_tenant.id, ANY_TENANT)).id == other_tenant.id


async def test_wait_false_answers_processing_with_progress(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        executor = FakeExecutor(gate=asyncio.Event())
        await cluster.start_worker("w1", executor)
        info, created = await cluster.api.create_context(register(wait=False))
        assert created and info.state == "PROCESSING" and info.progress == 0.0

        async def progressed() -> bool:
            return (await cluster.api.get_context(info.id)).progress == 0.5

        await cluster.until(progressed)
        with pytest.raises(ContextNotReadyError, match="still processing"):
            await cluster.api.query(info.id, QueryRequest("What is the pass key?"))
        assert executor.gate is not None
        executor.gate.set()

        async def ready() -> bool:
            return (await cluster.api.get_context(info.id)).state == "READY"

        await cluster.until(ready)


async def test_a_document_that_cannot_succeed_fails_with_the_reason(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        long_doc = "word " * 2000
        with pytest.raises(DocumentTooLongError) as caught:
            await cluster.api.create_context(register(long_doc))
        assert (caught.value.tokens, caught.value.limit) == (2000, 1000)
        info, created = await cluster.api.create_context(register(long_doc, wait=False))
        assert created and info.state == "PROCESSING"  # registering a FAILED one retries it

        async def failed_again() -> bool:
            return (await cluster.api.get_context(info.id)).state == "FAILED"

        await cluster.until(failed_again)
        failed = await cluster.api.get_context(info.id)
        assert failed.error is not None
        assert "2000 tokens" in failed.error
        with pytest.raises(ContextNotReadyError, match="failed"):
            await cluster.api.query(info.id, QueryRequest("Anything?"))


async def test_queries_stream_token_by_token_then_the_result(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        info, _ = await cluster.api.create_context(register())
        events = [e async for e in cluster.api.stream_query(info.id, QueryRequest("Key?"))]
        assert [e.delta for e in events[:-1]] == ["the", " pass", " key", " is", " 48213"]
        assert events[-1].result is not None
        assert events[-1].result.answer == "the pass key is 48213"
        result = await cluster.api.query(info.id, QueryRequest("Key?"))
        assert (result.answer, result.completion_tokens, result.cached_tokens) == (
            "the pass key is 48213",
            5,
            8,
        )
        replies = [k async for k in redis_env.client.scan_iter(match=f"{redis_env.prefix}reply:*")]
        assert replies == []  # every reply stream is dropped once read


async def test_closing_a_stream_early_cancels_the_generation(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        executor = FakeExecutor(words=tuple(f" w{i}" for i in range(200)), word_delay_s=0.01)
        await cluster.start_worker("w1", executor)
        info, _ = await cluster.api.create_context(register())
        stream = cluster.api.stream_query(info.id, QueryRequest("Key?"))
        first = await anext(stream)  # type: ignore[arg-type]
        assert first.delta == " w0"
        await stream.aclose()  # type: ignore[attr-defined]

        async def stopped() -> bool:
            return len(executor.stopped_early) == 1

        await cluster.until(stopped)


async def test_validation_happens_before_any_job(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        with pytest.raises(InvalidInputError, match="non-whitespace"):
            await cluster.api.create_context(register("   "))
        with pytest.raises(InvalidInputError, match="ttl_seconds"):
            await cluster.api.create_context(register(ttl_seconds=-1))
        with pytest.raises(ContextNotFoundError):
            await cluster.api.query("ctx_" + "0" * 32, QueryRequest("Key?"))
        assert await redis_env.client.xlen(cluster.keys.stream(INGEST)) == 0


async def test_without_a_live_worker_the_api_is_unready_and_refuses_work(
    redis_env: RedisEnv,
) -> None:
    async with Cluster(redis_env) as cluster:
        assert not cluster.api.is_ready()
        with pytest.raises(EngineUnavailableError, match="no live worker"):
            await cluster.api.create_context(register())
        await cluster.start_worker("w1", FakeExecutor())
        assert cluster.api.is_ready()
        await cluster.stop_worker("w1")  # a graceful stop removes the heartbeat at once
        await cluster.api.refresh()
        assert not cluster.api.is_ready()


async def test_a_full_backlog_is_a_queue_full_error(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        cluster.api.config = cluster.api.config.__class__(
            **{**cluster.api.config.__dict__, "queue_size": 2}
        )
        executor = FakeExecutor(gate=asyncio.Event())
        await cluster.start_worker("w1", executor)
        for i in range(2):  # one running, one waiting: both count until acknowledged
            await cluster.api.create_context(register(f"document {i}", wait=False))
        with pytest.raises(QueueFullError):
            await cluster.api.create_context(register("one too many", wait=False))
        assert executor.gate is not None
        executor.gate.set()


async def test_a_restarted_worker_reads_its_own_pending_jobs_first(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env, claim_idle_s=60.0) as cluster:
        gate = asyncio.Event()
        executor = FakeExecutor(gate=gate)
        await cluster.start_worker("w1", executor)
        info, _ = await cluster.api.create_context(register(wait=False))

        async def taken() -> bool:
            return executor.ingested == [info.id]

        await cluster.until(taken)
        await cluster.kill_worker("w1")  # mid-ingest: nothing acknowledged
        pending = await redis_env.client.xpending(cluster.keys.stream(INGEST), GROUP)
        assert pending["pending"] == 1
        restarted = FakeExecutor()
        await cluster.start_worker("w1", restarted)  # the same name, as after a restart

        async def ready() -> bool:
            return (await cluster.api.get_context(info.id)).state == "READY"

        await cluster.until(ready)
        assert restarted.ingested == [info.id]
        assert await cluster.events() == [("READY", info.id)]


async def test_a_dead_workers_job_is_claimed_and_ready_exactly_once(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env, claim_idle_s=0.5) as cluster:
        stuck = FakeExecutor(gate=asyncio.Event())
        await cluster.start_worker("dies", stuck)
        info, _ = await cluster.api.create_context(register(wait=False))

        async def taken() -> bool:
            return stuck.ingested == [info.id]

        await cluster.until(taken)
        await cluster.kill_worker("dies")
        rescuer = FakeExecutor()
        await cluster.start_worker("rescuer", rescuer)

        async def ready() -> bool:
            return (await cluster.api.get_context(info.id)).state == "READY"

        await cluster.until(ready)
        assert rescuer.ingested == [info.id]
        assert await cluster.events() == [("READY", info.id)]
        record = await cluster.api.records.get(info.id)
        assert record is not None and record.worker == "rescuer"


async def test_a_live_workers_long_job_is_not_taken_over(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env, claim_idle_s=0.3) as cluster:
        slow = FakeExecutor(gate=asyncio.Event())
        other = FakeExecutor()
        await cluster.start_worker("slow", slow)
        info, _ = await cluster.api.create_context(register(wait=False))

        async def taken() -> bool:
            return slow.ingested == [info.id]

        await cluster.until(taken)
        await cluster.start_worker("other", other)
        await asyncio.sleep(1.5)  # five claim bounds: the job is kept alive all along
        assert other.ingested == []
        assert slow.gate is not None
        slow.gate.set()

        async def ready() -> bool:
            return (await cluster.api.get_context(info.id)).state == "READY"

        await cluster.until(ready)
        assert await cluster.events() == [("READY", info.id)]


async def test_a_worker_whose_engine_hangs_lets_its_job_go_and_stops(redis_env: RedisEnv) -> None:
    """Issue 13 item 8: a hung engine thread (no progress within `engine_stall_s`) no longer
    keeps its job alive forever: the worker stops keeping it, stops itself (fatal, for its
    orchestrator to restart) and another worker finishes the job, READY once."""
    from service.serving.distributed.loops import EngineHungError

    async with Cluster(redis_env, claim_idle_s=0.3, engine_stall_s=0.4) as cluster:
        hung = FakeExecutor(gate=asyncio.Event())  # never released: the engine is stuck
        worker = await cluster.start_worker("hung", hung)
        info, _ = await cluster.api.create_context(register(wait=False))

        async def taken() -> bool:
            return hung.ingested == [info.id]

        await cluster.until(taken)
        await asyncio.sleep(1.0)  # a long job, not a hung one: still kept (no stall reported)
        rescuer = FakeExecutor()
        await cluster.start_worker("rescuer", rescuer)
        await asyncio.sleep(1.0)
        assert rescuer.ingested == []
        hung.stalled = 10.0  # now its engine thread has made no progress for a while

        async def ready() -> bool:
            return (await cluster.api.get_context(info.id)).state == "READY"

        await cluster.until(ready)
        assert rescuer.ingested == [info.id]
        assert await cluster.events() == [("READY", info.id)]
        await asyncio.wait_for(asyncio.shield(cluster.running["hung"].task), 10)
        assert isinstance(worker.fatal, EngineHungError)


async def test_a_job_delivered_too_often_is_dead_lettered_and_fails(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env, claim_idle_s=0.2, max_deliveries=3) as cluster:
        crashing = FakeExecutor(crash_with=ValueError("a bug that fails every time"))
        await cluster.start_worker("w1", crashing)
        info, _ = await cluster.api.create_context(register(wait=False))

        async def failed() -> bool:
            return (await cluster.api.get_context(info.id)).state == "FAILED"

        await cluster.until(failed)
        assert crashing.ingested == [info.id] * 3  # three deliveries ran, the fourth did not
        failure = await cluster.api.get_context(info.id)
        assert failure.error is not None and "delivered 4 times" in failure.error
        dead = await redis_env.client.xrange(cluster.keys.dead_letter)
        assert len(dead) == 1
        fields = dead[0][1]
        assert fields[b"deliveries"] == b"4" and b"crashed" in fields[b"reason"]
        job = decode_job(fields)
        assert isinstance(job, IngestJob) and job.context_id == info.id
        assert await redis_env.client.xlen(cluster.keys.stream(INGEST)) == 0


async def test_a_malformed_entry_goes_straight_to_the_dead_letters(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        await redis_env.client.xadd(cluster.keys.stream(INGEST), {"kind": "ingest", "body": "{"})

        async def dead() -> bool:
            return await redis_env.client.xlen(cluster.keys.dead_letter) == 1

        await cluster.until(dead)


async def test_delete_expiry_and_the_sweep(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        executor = FakeExecutor()
        worker = await cluster.start_worker("w1", executor)
        kept, _ = await cluster.api.create_context(register("kept"))
        deleted, _ = await cluster.api.create_context(register("deleted"))
        short, _ = await cluster.api.create_context(register("short-lived", ttl_seconds=0.3))
        await cluster.api.delete_context(deleted.id)
        with pytest.raises(ContextNotFoundError):
            await cluster.api.get_context(deleted.id)
        await asyncio.sleep(0.4)
        with pytest.raises(ContextNotFoundError):
            await cluster.api.get_context(short.id)  # expired: the record key is gone
        assert await worker.housekeeping.sweep() == 2
        assert sorted(executor.purged) == sorted([deleted.id, short.id])
        assert await worker.housekeeping.sweep() == 0  # each purge happens once
        later = datetime.now(UTC) + timedelta(hours=2)
        updated = await cluster.api.update_context(kept.id, later)
        assert updated.expire_time is not None
        assert abs((updated.expire_time - later).total_seconds()) < 1
        ttl_ms = await redis_env.client.pttl(cluster.keys.context(kept.id))
        assert 7_100_000 < ttl_ms <= 7_200_000
        with pytest.raises(InvalidInputError, match="future"):
            await cluster.api.update_context(kept.id, datetime.now(UTC) - timedelta(seconds=5))


async def test_listing_pages_by_tenant_oldest_first(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        ids = []
        for i in range(5):
            info, _ = await cluster.api.create_context(register(f"doc {i}", wait=False))
            ids.append(info.id)
            time.sleep(0.002)
        await cluster.api.create_context(register("theirs", tenant="acme", wait=False))
        first = await cluster.api.list_contexts(page_size=2)
        assert [c.id for c in first.contexts] == ids[:2] and first.next_page_token
        second = await cluster.api.list_contexts(page_size=2, page_token=first.next_page_token)
        third = await cluster.api.list_contexts(page_size=2, page_token=second.next_page_token)
        assert [c.id for c in second.contexts + third.contexts] == ids[2:]
        assert third.next_page_token is None
        everyone = await cluster.api.list_contexts(ANY_TENANT, page_size=50)
        assert len(everyone.contexts) == 6


async def test_a_device_failure_stops_the_worker_and_its_job_moves_on(
    redis_env: RedisEnv,
) -> None:
    async with Cluster(redis_env, claim_idle_s=0.3) as cluster:
        broken = FakeExecutor(crash_with=RuntimeError("CUDA error: an illegal memory access"))
        worker = await cluster.start_worker("broken", broken)
        info, _ = await cluster.api.create_context(register(wait=False))
        await asyncio.wait_for(cluster.running["broken"].task, 10)  # it stopped by itself
        assert isinstance(worker.fatal, RuntimeError)
        assert not await redis_env.client.exists(cluster.keys.heartbeat("broken"))
        del cluster.running["broken"]
        await cluster.start_worker("healthy", FakeExecutor())

        async def ready() -> bool:
            return (await cluster.api.get_context(info.id)).state == "READY"

        await cluster.until(ready)
        assert await cluster.events() == [("READY", info.id)]


async def test_a_context_deleted_while_it_ingests_is_purged_not_revived(
    redis_env: RedisEnv,
) -> None:
    async with Cluster(redis_env) as cluster:
        executor = FakeExecutor(gate=asyncio.Event())
        worker = await cluster.start_worker("w1", executor)
        info, _ = await cluster.api.create_context(register(wait=False))

        async def taken() -> bool:
            return executor.ingested == [info.id]

        await cluster.until(taken)
        await cluster.api.delete_context(info.id)
        assert executor.gate is not None
        executor.gate.set()

        async def drained() -> bool:
            return await redis_env.client.xlen(cluster.keys.stream(INGEST)) == 0

        await cluster.until(drained)
        with pytest.raises(ContextNotFoundError):
            await cluster.api.get_context(info.id)
        assert await cluster.events() == []  # never READY
        assert await worker.housekeeping.sweep() == 1 and executor.purged == [info.id]
