"""A worker runs as many query jobs at once as its scheduler admits (they decode in one
batch), queries spread over workers, and a job claimed away is never run twice."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from service.serving.distributed.jobs import QUERY
from service.serving.distributed.keys import GROUP
from service.types import CreateContextRequest, QueryRequest
from tests.distributed.distributed_testing import Cluster, FakeExecutor
from tests.storage.storage_testing import RedisEnv

pytestmark = pytest.mark.redis

DOC = "The pass key is 48213. Remember it. " * 20


async def _ask(cluster: Cluster, cid: str, n: int) -> list[str]:
    answers = await asyncio.gather(
        *(cluster.api.query(cid, QueryRequest(f"Key {i}?")) for i in range(n))
    )
    return [a.answer for a in answers]


async def test_a_worker_answers_several_queries_at_once(redis_env: RedisEnv) -> None:
    slow = FakeExecutor(word_delay_s=0.2)  # one answer: 5 words, 1 s
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", slow, max_queries=4)
        info, _ = await cluster.api.create_context(CreateContextRequest(DOC))
        started = time.monotonic()
        answers = await asyncio.wait_for(_ask(cluster, info.id, 4), 20)
        elapsed = time.monotonic() - started
    assert answers == ["the pass key is 48213"] * 4
    assert elapsed < 2.5, f"4 answers of 1 s took {elapsed:.1f} s: not run together"


async def test_queries_spread_over_two_workers(redis_env: RedisEnv) -> None:
    first, second = FakeExecutor(word_delay_s=0.1), FakeExecutor(word_delay_s=0.1)
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", first, max_queries=2)
        await cluster.start_worker("w2", second, max_queries=2)
        info, _ = await cluster.api.create_context(CreateContextRequest(DOC))
        await asyncio.wait_for(_ask(cluster, info.id, 8), 20)
    assert len(first.answered) + len(second.answered) == 8
    assert first.answered and second.answered


async def test_a_job_claimed_away_is_not_run_twice(redis_env: RedisEnv) -> None:
    mine, theirs = FakeExecutor(), FakeExecutor()
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w0", FakeExecutor())
        info, _ = await cluster.api.create_context(CreateContextRequest(DOC))
        await cluster.stop_worker("w0")
        a = cluster.worker("a", mine)
        b = cluster.worker("b", theirs)
        await a.queue.ensure_group("a")
        job = await cluster.api._submit_query(info.id, QueryRequest("Key?"))
        (delivery,) = await a.queue.read_new("a", 100, {QUERY: 1})  # prefetched by a
        stream = cluster.keys.stream(QUERY)
        await redis_env.client.xclaim(stream, GROUP, "b", 0, [delivery.entry_id])  # b takes it
        await a.handle(delivery)  # a must not run it now
        assert mine.answered == [] and not await a.queue.keep_alive(delivery, "a")
        (claimed,) = await b.queue.claim_idle("b", 0)
        await b.handle(claimed)
        assert theirs.answered == [info.id]
        assert job.request_id


async def test_workers_recreate_their_streams_after_redis_lost_them(redis_env: RedisEnv) -> None:
    """Issue 13 item 6: after the job streams vanish (FLUSHALL, a restart without
    persistence), a running worker makes them again and serves the next registration."""
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        keys = [k async for k in redis_env.client.scan_iter(match=f"{redis_env.prefix}jobs:*")]
        assert keys
        await redis_env.client.delete(*keys)  # what a flush does to this deployment's streams
        info, _ = await asyncio.wait_for(
            cluster.api.create_context(CreateContextRequest("after the loss " + DOC)), 15
        )
        assert info.state == "READY"


async def test_a_heartbeat_with_unknown_or_broken_fields_does_not_stop_the_monitor(
    redis_env: RedisEnv,
) -> None:
    """Issue 13 item 11: a newer worker's extra field, or a broken beat, is ignored."""
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        beat = cluster.keys.heartbeat("w1")
        body = json.loads(await redis_env.client.get(beat))
        await redis_env.client.set(beat, json.dumps({**body, "gpu_temp": 71}), px=5000)
        await redis_env.client.sadd(cluster.keys.workers, "broken")
        await redis_env.client.set(cluster.keys.heartbeat("broken"), b"{not json", px=5000)
        await cluster.api.refresh()
        assert [w.name for w in cluster.api.workers] == ["w1"] and cluster.api.is_ready()
        assert cluster.api._monitor is not None and not cluster.api._monitor.done()


async def test_a_registration_whose_job_never_reached_the_stream_is_resubmitted(
    redis_env: RedisEnv,
) -> None:
    """Issue 13 item 7: the API stopped between the record and XADD; registering the same
    document again submits the job (instead of PROCESSING for the whole TTL)."""
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    from service.config import ServiceConfig
    from service.serving.distributed.remote_record import RemoteRecord
    from service.serving.ids import context_id
    from service.serving.registry import processing_record
    from service.serving.validation import validated_create
    from tests.distributed.distributed_testing import IDENTITY

    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        request = CreateContextRequest("orphaned " + DOC)
        checked = validated_create(request, ServiceConfig())
        cid = context_id(IDENTITY, checked.compression, "", None, request.text)
        old = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
        record = replace(processing_record(cid, checked, "fake-model"), create_time=old)
        await cluster.api.records.create(RemoteRecord(record))  # ...and then the API died
        info, created = await asyncio.wait_for(cluster.api.create_context(request), 15)
        assert (info.id, info.state, created) == (cid, "READY", False)
