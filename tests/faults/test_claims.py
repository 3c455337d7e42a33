"""Two workers racing for the same claims: a worker dies holding an ingest and several
queries (read, not acknowledged) while more ingests wait unread; two fresh workers start at
the same instant and both claim (XAUTOCLAIM) and read (XREADGROUP) at once.

In process (real StreamWorkers and RemoteContextService on the real Redis, a fake executor
that counts what it runs), because only there can "each job ran exactly once" be counted;
killing real worker processes mid-job is tests/faults/test_workers.py.
"""

from __future__ import annotations

import asyncio

import pytest

from service.serving.distributed.jobs import INGEST, QUERY
from service.serving.distributed.keys import GROUP
from service.types import CreateContextRequest, QueryRequest
from tests.distributed.distributed_testing import Cluster, FakeExecutor
from tests.storage.storage_testing import RedisEnv

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

QUERIES, INGESTS = 6, 4
DOC = "The pass key is 48213. Remember it. " * 20
HOUR_S = 3600.0


async def test_two_workers_racing_for_a_dead_workers_jobs_run_each_exactly_once(
    redis_env: RedisEnv,
) -> None:
    hung = FakeExecutor(gate=asyncio.Event(), word_delay_s=HOUR_S)  # takes jobs, ends none
    # answers of 1 s, longer than claim_idle_s: only kept alive do they stay with one worker
    first, second = FakeExecutor(word_delay_s=0.2), FakeExecutor(word_delay_s=0.2)
    async with Cluster(redis_env, claim_idle_s=0.4, heartbeat_ttl_s=3.0) as cluster:
        await cluster.start_worker("w0", FakeExecutor())
        asked = [await registered(cluster, f"asked {i} {DOC}") for i in range(QUERIES)]
        await cluster.stop_worker("w0")
        await cluster.start_worker("dies", hung, max_queries=QUERIES)
        added = [
            (await cluster.api.create_context(CreateContextRequest(f"new {i} {DOC}", wait=False)))[
                0
            ].id
            for i in range(INGESTS)
        ]
        asking = [asyncio.create_task(cluster.api.query(c, QueryRequest("Key?"))) for c in asked]

        async def holding_all() -> bool:
            return len(hung.ingested) == 1 and len(hung.answered) == QUERIES

        await cluster.until(holding_all)
        await cluster.kill_worker("dies")  # its jobs stay pending, no longer kept alive
        await asyncio.gather(cluster.start_worker("a", first), cluster.start_worker("b", second))
        answers = await asyncio.wait_for(asyncio.gather(*asking), 15)

        async def all_ready() -> bool:
            infos = [await cluster.api.get_context(c) for c in added]
            return all(i.state == "READY" for i in infos)

        await cluster.until(all_ready)
        events = await cluster.events()
        dead = await redis_env.client.xlen(cluster.keys.dead_letter)
        backlog = [await redis_env.client.xlen(cluster.keys.stream(k)) for k in (INGEST, QUERY)]
    assert [a.answer for a in answers] == ["the pass key is 48213"] * QUERIES
    completed = first.completed + second.completed
    assert len(completed) == len(set(completed)) == QUERIES  # every question run once
    assert sorted(first.ingested + second.ingested) == sorted(added)  # every ingest once
    ready = [cid for event, cid in events if event == "READY"]
    assert sorted(ready) == sorted(asked + added)  # READY exactly once each
    assert (dead, backlog) == (0, [0, 0])


async def test_claims_at_the_same_instant_split_the_entries(redis_env: RedisEnv) -> None:
    """XAUTOCLAIM by two workers at once: every idle entry goes to exactly one of them."""
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w0", FakeExecutor())
        a, b = cluster.worker("a", FakeExecutor()), cluster.worker("b", FakeExecutor())
        await cluster.stop_worker("w0")
        stream = cluster.keys.stream(INGEST)
        for i in range(40):
            await redis_env.client.xadd(stream, {"kind": "ingest", "body": str(i)})
        await redis_env.client.xreadgroup(GROUP, "dead", {stream: ">"}, count=40)
        await asyncio.sleep(0.3)  # idle past the bound (a claim makes an entry idle again)
        got_a, got_b = await asyncio.gather(
            a.queue.claim_idle("a", 200), b.queue.claim_idle("b", 200)
        )
    ids_a, ids_b = {d.entry_id for d in got_a}, {d.entry_id for d in got_b}
    assert not ids_a & ids_b
    assert len(ids_a | ids_b) == min(40, 2 * 16)  # each claims at most 16 per stream per round


async def registered(cluster: Cluster, text: str) -> str:
    info, _ = await cluster.api.create_context(CreateContextRequest(text))
    assert info.state == "READY"
    return info.id
