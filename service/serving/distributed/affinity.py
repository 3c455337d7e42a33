"""Context affinity: a query goes to the worker that holds its context resident on the device,
when that worker is alive and has a free query slot; otherwise to any worker.

    API: holder = a live heartbeat listing the context in `resident` whose `own_slots`
         (its query slots minus those running jobs from other streams) exceed the entries
         of its own stream (checked and added in one script; most slots first)
           ├─ yes ─► XADD {p}jobs:direct:<holder> (and SADD {p}jobs:direct)    route "holder"
           └─ no ──► XADD {p}jobs:query (the shared stream)                    route "any"
    worker: reads its own stream before the shared ones (transport.read_new); every
         `grace_s / 2`, up to its free slots, takes the entries of another worker's own
         stream that nobody read: all of them once that worker's heartbeat is gone, those
         older than `grace_s` while it lives (it is busy, or hung); removes the own stream
         of a gone worker once it is empty.

Each worker's stream has the same consumer group as the shared ones, so everything else is
the machinery every job has: XREADGROUP > hands an entry to one consumer only, an entry read
and not acknowledged is claimed after `claim_idle_s` (XAUTOCLAIM covers these streams too),
`owns` is checked before a job runs and `keep_alive` while it runs, dead letters after
`max_deliveries`. The entries of a worker's own stream (waiting or running) count in real
time; only its work from other streams is as old as its last beat (a third of the TTL): a
stale beat costs a detour (an entry waits up to `grace_s`, or runs on a worker that must
load the context), never a lost or doubled job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from service import telemetry
from service.config import DistributedConfig
from service.serving.distributed.heartbeat import Heartbeats, WorkerBeat
from service.serving.distributed.jobs import QueryJob
from service.serving.distributed.transport import Delivery, JobQueue

log = logging.getLogger(__name__)

RESIDENT_PUBLISHED = 256  # context ids a heartbeat lists at most (the most recently used)


def holders(context_id: str, workers: Sequence[WorkerBeat]) -> list[WorkerBeat]:
    """The live workers holding the context resident with a free slot, most room first."""
    found = [w for w in workers if w.own_slots > 0 and context_id in w.resident]
    return sorted(found, key=lambda w: (-w.own_slots, w.name))


async def submit_query(queue: JobQueue, job: QueryJob, workers: Sequence[WorkerBeat]) -> str | None:
    """Submit `job` to the own stream of a holder of its context with room, else to the
    shared stream; the worker it went to (None: any)."""
    for beat in holders(job.context_id, workers):
        if await queue.submit_to(job, beat.name, below=beat.own_slots) is not None:
            telemetry.QUERY_ROUTES.labels("holder").inc()
            return beat.name
    await queue.submit(job)
    telemetry.QUERY_ROUTES.labels("any").inc()
    return None


async def take_over(
    queue: JobQueue, heartbeats: Heartbeats, consumer: str, free: int, grace: float
) -> list[Delivery]:
    """Entries of other workers' own streams that `consumer` should run (at most `free`);
    the stream of a worker that is gone is removed once empty."""
    found: list[Delivery] = []
    for worker in await queue.direct_workers():
        if worker == consumer:
            continue
        alive = await heartbeats.alive(worker)
        if free > len(found):
            before_ms = int((time.time() - (grace if alive else 0.0)) * 1000)
            found += await queue.take_unread(consumer, worker, before_ms, free - len(found))
        if not alive and await queue.drop_direct(worker):
            log.info("worker %s: removed the empty stream of gone worker %s", consumer, worker)
    if found:
        log.info("worker %s: took %d queries routed to others", consumer, len(found))
    return found


class TakeOvers:
    """A worker's rounds of taking over the jobs of others: entries idle longer than
    `claim_idle_s` (read by a worker that died or hung) every `claim_idle_s / 2`, and unread
    queries routed to others (`take_over`) every `grace_s / 2`."""

    def __init__(
        self,
        queue: JobQueue,
        heartbeats: Heartbeats,
        name: str,
        config: DistributedConfig,
        block_ms: int,
    ) -> None:
        self.queue, self.heartbeats, self.name = queue, heartbeats, name
        self.claim_idle_s = config.claim_idle_s
        # an entry may wait unread in a live worker's stream for one beat period (a free
        # worker reads its stream within one blocking read, `block_ms`)
        self.grace_s = max(config.heartbeat_ttl_s / 3, 2 * block_ms / 1000)
        self._next_claim = self._next_take = 0.0

    async def due(self, free_queries: int) -> list[Delivery]:
        """The entries whose round is due (unread ones at most `free_queries`)."""
        found: list[Delivery] = []
        if time.monotonic() >= self._next_claim:
            found += await self.queue.claim_idle(self.name, int(self.claim_idle_s * 1000))
            self._next_claim = time.monotonic() + self.claim_idle_s / 2
        if time.monotonic() >= self._next_take:
            free = max(0, free_queries - len(found))
            found += await take_over(self.queue, self.heartbeats, self.name, free, self.grace_s)
            self._next_take = time.monotonic() + self.grace_s / 2
        return found
