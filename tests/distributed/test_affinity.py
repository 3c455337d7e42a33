"""Context affinity (service.serving.distributed.affinity): a query goes to the worker that
holds its context resident while that worker is alive and has a free slot, else to any
worker; a query routed to a worker that is gone or busy is still answered, exactly once."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from service import telemetry
from service.config import EngineConfig
from service.engine.kvzip_engine import KVzipEngine
from service.serving.distributed.affinity import submit_query
from service.serving.distributed.executor import EngineExecutor, build_shared_store
from service.serving.distributed.heartbeat import WorkerBeat
from service.serving.distributed.jobs import RESULT, QueryJob
from service.serving.distributed.keys import GROUP
from service.serving.distributed.protocol import Executor
from service.types import CreateContextRequest, QueryRequest
from storage import redis_client
from tests.distributed.distributed_testing import IDENTITY, REDIS_URL, Cluster, FakeExecutor
from tests.distributed.test_engine_worker import QUESTION, engine_cluster
from tests.storage.storage_testing import RedisEnv

pytestmark = pytest.mark.redis

DOC = "The pass key is 48213. Remember it. " * 20
ANSWER = "the pass key is 48213"


def routed(route: str) -> float:
    return telemetry.QUERY_ROUTES.labels(route)._value.get()


async def published(cluster: Cluster, holders: dict[str, str]) -> None:
    """Wait until the API sees each worker's beat list its context, with a free slot."""

    async def seen() -> bool:
        await cluster.api.refresh()
        beats = {w.name: w for w in cluster.api.workers}
        return all(
            name in beats
            and cid in beats[name].resident
            and beats[name].own_slots > 0
            for name, cid in holders.items()
        )

    await cluster.until(seen)


async def ask(cluster: Cluster, cid: str, n: int = 1) -> list[str]:
    answers = await asyncio.gather(
        *(cluster.api.query(cid, QueryRequest(f"Key {i}?")) for i in range(n))
    )
    return [a.answer for a in answers]


async def two_holders(
    cluster: Cluster, a: Executor, b: Executor, **kw: object
) -> tuple[str, str]:
    """Worker "a" holds context x resident, worker "b" context y (each ingested its own)."""
    await cluster.start_worker("a", a, **kw)
    x, _ = await cluster.api.create_context(CreateContextRequest("X. " + DOC))
    await cluster.stop_worker("a")  # the job loop stops; its device (the executor) stays
    await cluster.start_worker("b", b, **kw)
    y, _ = await cluster.api.create_context(CreateContextRequest("Y. " + DOC))
    await cluster.start_worker("a", a, **kw)
    await published(cluster, {"a": x.id, "b": y.id})
    return x.id, y.id


async def kill_hard(redis_env: RedisEnv, cluster: Cluster, name: str) -> None:
    """Cancel the worker and put its last heartbeat back for one TTL (1 s): what a SIGKILLed
    process leaves behind. The API still sees it alive."""
    beat = await redis_env.client.get(cluster.keys.heartbeat(name))
    await cluster.kill_worker(name)
    await redis_env.client.set(cluster.keys.heartbeat(name), beat, px=1000)
    await redis_env.client.sadd(cluster.keys.workers, name)
    await cluster.api.refresh()
    assert name in [w.name for w in cluster.api.workers]


async def no_job_left(redis_env: RedisEnv, cluster: Cluster) -> None:
    """Every job stream (the shared ones and each worker's own) empty and nothing pending."""
    streams = [k async for k in redis_env.client.scan_iter(match=f"{redis_env.prefix}jobs:*")]
    for stream in streams:
        if await redis_env.client.type(stream) != b"stream" or stream.endswith(b"jobs:dead"):
            continue
        assert await redis_env.client.xlen(stream) == 0, stream
        assert (await redis_env.client.xpending(stream, GROUP))["pending"] == 0, stream
    assert await redis_env.client.xlen(cluster.keys.dead_letter) == 0


async def test_each_context_is_answered_by_the_worker_that_holds_it(redis_env: RedisEnv) -> None:
    a, b = FakeExecutor(word_delay_s=0.01), FakeExecutor(word_delay_s=0.01)
    async with Cluster(redis_env) as cluster:
        x, y = await two_holders(cluster, a, b, max_queries=4)
        a.answered.clear(), b.answered.clear()
        before = routed("holder")
        for _ in range(2):  # several rounds, each with queries on both contexts at once
            answers = await asyncio.wait_for(
                asyncio.gather(ask(cluster, x, 3), ask(cluster, y, 3)), 20
            )
            assert answers == [[ANSWER] * 3] * 2
        assert a.answered == [x] * 6 and b.answered == [y] * 6
        assert routed("holder") - before == 12
        await no_job_left(redis_env, cluster)


async def test_a_query_routed_to_a_killed_holder_is_answered_by_another(
    redis_env: RedisEnv,
) -> None:
    a, b = FakeExecutor(), FakeExecutor()
    async with Cluster(redis_env) as cluster:
        x, _ = await two_holders(cluster, a, b)
        await kill_hard(redis_env, cluster, "a")
        before, started = routed("holder"), time.monotonic()
        assert await asyncio.wait_for(ask(cluster, x), 10) == [ANSWER]
        elapsed = time.monotonic() - started
        assert routed("holder") == before + 1  # it went to a's own stream ...
        assert b.answered == [x] and a.answered == []  # ... and b answered it
        assert elapsed < 5.0, f"took {elapsed:.1f} s"

        async def stream_removed() -> bool:  # a is gone and its stream empty: removed
            members = await redis_env.client.smembers(cluster.keys.direct_workers)
            return not await redis_env.client.exists(cluster.keys.direct("a")) and (
                b"a" not in members
            )

        await cluster.until(stream_removed)
        await no_job_left(redis_env, cluster)


async def test_a_holder_killed_mid_answer_has_it_answered_once_by_another(
    redis_env: RedisEnv,
) -> None:
    a, b = FakeExecutor(word_delay_s=0.5), FakeExecutor()
    async with Cluster(redis_env) as cluster:
        x, _ = await two_holders(cluster, a, b)
        answer = asyncio.create_task(cluster.api.query(x, QueryRequest("Key?")))
        try:
            await cluster.until(lambda: asyncio.sleep(0, bool(a.answered)))
            await kill_hard(redis_env, cluster, "a")  # read from its own stream, not acknowledged
            assert (await asyncio.wait_for(answer, 10)).answer == ANSWER
        finally:
            answer.cancel()
        assert a.completed == [] and len(b.completed) == 1  # claimed from a's stream
        await no_job_left(redis_env, cluster)


async def test_a_busy_holder_leaves_the_query_to_any_worker(redis_env: RedisEnv) -> None:
    a, b = FakeExecutor(word_delay_s=0.4), FakeExecutor()  # a's answers take 2 s
    async with Cluster(redis_env) as cluster:
        x, _ = await two_holders(cluster, a, b, max_queries=1)
        first = asyncio.create_task(cluster.api.query(x, QueryRequest("First?")))
        try:
            await cluster.until(lambda: asyncio.sleep(0, bool(a.answered)))  # slot taken
            before = routed("any")
            assert await asyncio.wait_for(ask(cluster, x), 5) == [ANSWER]
            assert not first.done()  # answered while the holder was still busy
            assert routed("any") == before + 1 and b.answered == [x]
            assert (await asyncio.wait_for(first, 10)).answer == ANSWER
        finally:
            first.cancel()
        assert len(a.completed) == 1 and len(b.completed) == 1
        await no_job_left(redis_env, cluster)


async def test_an_entry_the_holder_does_not_read_within_the_grace_moves(
    redis_env: RedisEnv,
) -> None:
    """The API's view was stale: a query went to a holder whose only slot is busy. Another
    worker takes it once it is older than the grace (and not before)."""
    a, b = FakeExecutor(word_delay_s=0.6), FakeExecutor()  # a's answers take 3 s
    async with Cluster(redis_env) as cluster:
        x, _ = await two_holders(cluster, a, b, max_queries=1)
        first = asyncio.create_task(cluster.api.query(x, QueryRequest("First?")))
        try:
            await cluster.until(lambda: asyncio.sleep(0, bool(a.answered)))
            stale = WorkerBeat("a", IDENTITY, own_slots=2, resident=[x])  # a has 1 slot
            job = QueryJob(uuid.uuid4().hex, x, QueryRequest("Second?"), time.time() + 20)
            started = time.monotonic()
            assert await submit_query(cluster.api.queue, job, [stale]) == "a"
            result = await asyncio.wait_for(_result(cluster, job), 10)
            elapsed = time.monotonic() - started
            assert result == ANSWER and not first.done()
            grace = cluster.running["b"].worker.take_overs.grace_s
            assert grace * 0.9 <= elapsed < grace + 3.0, (elapsed, grace)
            assert b.completed == [job.request_id]
            await asyncio.wait_for(first, 10)
        finally:
            first.cancel()
        assert len(a.completed) == 1
        await no_job_left(redis_env, cluster)


async def _result(cluster: Cluster, job: QueryJob) -> str:
    async for reply in cluster.api._replies(job):
        if reply.type == RESULT and reply.result is not None:
            return reply.result.answer
    raise AssertionError("no result")


async def test_nothing_runs_twice_under_mixed_routes(redis_env: RedisEnv) -> None:
    """More queries than slots: some go to their holder, some to any worker, some wait and
    move; every one is answered exactly once and no job is left behind."""
    a, b = FakeExecutor(word_delay_s=0.05), FakeExecutor(word_delay_s=0.05)
    async with Cluster(redis_env) as cluster:
        x, y = await two_holders(cluster, a, b, max_queries=2)
        a.completed.clear(), b.completed.clear()
        answers = await asyncio.wait_for(
            asyncio.gather(ask(cluster, x, 8), ask(cluster, y, 8)), 30
        )
        assert answers == [[ANSWER] * 8] * 2
        done = a.completed + b.completed
        assert len(done) == 16 and len(set(done)) == 16
        assert a.stopped_early == [] and b.stopped_early == []
        await no_job_left(redis_env, cluster)


async def test_a_stopping_worker_publishes_no_free_slot(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        worker = await cluster.start_worker("a", FakeExecutor(resident=["ctx_1"]), max_queries=3)
        assert worker._beat_now().own_slots == 3
        assert worker._beat_now().resident == ["ctx_1"]
        worker._stop.set()
        assert worker._beat_now().own_slots == 0


async def test_with_the_engine_a_context_is_answered_where_it_is_resident(
    redis_env: RedisEnv, tiny_engine: KVzipEngine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two workers on the tiny random model (each its own engine): every query is a hit of
    its holder's device-resident LRU, none loads a context on the other worker."""
    other = await asyncio.to_thread(
        KVzipEngine.load, EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32")
    )
    cluster, a = await engine_cluster(redis_env, tiny_engine, tmp_path, 1 << 26)
    client = redis_client(REDIS_URL, timeout_s=5.0, retries=0)
    cluster._clients.append(client)
    b = EngineExecutor(cluster.config, other, build_shared_store(cluster.config, client))
    try:
        async with cluster:
            x, y = await two_holders(cluster, a, b, max_queries=4)
            before = [(e.resident.hits, e.resident.misses) for e in (a, b)]
            answers = await asyncio.wait_for(
                asyncio.gather(*(cluster.api.query(c, QUESTION) for c in (x, y, x, y))), 60
            )
            assert answers[0].answer == answers[2].answer and answers[0].completion_tokens
            after = [(e.resident.hits, e.resident.misses) for e in (a, b)]
            assert after == [(h + 2, m) for h, m in before]  # two hits each, no load
            done = {n: r.worker for n, r in cluster.running.items()}  # counted after the ACK
            await cluster.until(
                lambda: asyncio.sleep(0, (done["a"].jobs_done, done["b"].jobs_done) == (2, 3))
            )  # a (restarted): x's two queries; b: y's ingest and two queries
    finally:
        await a.close()
        await b.close()
