"""StreamWorker: the job loop of one worker process (no torch here; the engine work is done
by an `Executor`, see service.serving.distributed.executor).

    start ─► own pending entries (after a restart) ─► loop:
               every claim_idle_s/2: XAUTOCLAIM entries idle > claim_idle_s (dead workers)
               every grace_s/2: unread queries routed to other workers that are gone or
                 busy (distributed.affinity), up to the free query slots
               XREADGROUP as many new entries as there are free slots (`max_queries`
               queries, decoded in one batch by the executor's scheduler; one ingest),
                 from its own query stream first (context affinity), then the shared ones
             each entry, a task: still ours? else skip (another worker claimed it);
               delivered > max_deliveries? ─► dead letter (+ context FAILED)
               else run it, keeping it alive; ACK only once the result is durable

Jobs are idempotent, so at-least-once delivery never duplicates a context (an ingest whose
record is not PROCESSING any more is acknowledged without work). A domain error fails the
context at once; any other error leaves the entry for whichever worker claims it next, at
most `max_deliveries` times. Ingest: ingest_jobs; queries: query_jobs; beside them the
expiry sweep, records rebuilt from the stored objects, and purges: housekeeping.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.config import DistributedConfig
from service.serving.distributed.affinity import RESIDENT_PUBLISHED, TakeOvers
from service.serving.distributed.heartbeat import Heartbeats, WorkerBeat
from service.serving.distributed.housekeeping import Housekeeping
from service.serving.distributed.ingest_jobs import IngestJobs
from service.serving.distributed.jobs import (
    INGEST,
    QUERY,
    IngestJob,
    MalformedJobError,
    delivered_too_often,
)
from service.serving.distributed.keys import RedisKeys
from service.serving.distributed.loops import (
    beat_forever,
    beside,
    is_device_failure,
    raise_if_cancelled,
    sleep_or_stop,
    watch_engine,
)
from service.serving.distributed.protocol import Executor, Progress
from service.serving.distributed.query_jobs import QueryJobs
from service.serving.distributed.redis_records import RecordStore
from service.serving.distributed.transport import Delivery, JobQueue

__all__ = ["Executor", "Progress", "StreamWorker"]

log = logging.getLogger(__name__)


class StreamWorker:
    """Serves the job streams until `stop` is set."""

    def __init__(
        self,
        client: Redis,
        keys: RedisKeys,
        config: DistributedConfig,
        executor: Executor,
        name: str,
        *,
        block_ms: int = 500,
        progress_interval_s: float = 0.25,
        sweep_interval_s: float = 60.0,
        max_queries: int = 1,
    ) -> None:
        self.client, self.keys, self.config = client, keys, config
        self.executor, self.name = executor, name
        self.queue = JobQueue(client, keys)
        self.records = RecordStore(client, keys)
        self.heartbeats = Heartbeats(client, keys, config.heartbeat_ttl_s)
        self.queries = QueryJobs(self.queue, self.records, executor, name, self._stop_if_fatal)
        self.ingests = IngestJobs(
            self.queue, self.records, executor, name, self._stop_if_fatal, progress_interval_s
        )
        self.housekeeping = Housekeeping(client, keys, executor, name, sweep_interval_s)
        self.block_ms = block_ms
        self.slots = {QUERY: max_queries, INGEST: 1}
        self.take_overs = TakeOvers(self.queue, self.heartbeats, name, config, block_ms)
        self.beat = WorkerBeat(name, executor.identity, device=executor.device)
        self.jobs_done = 0
        self.fatal: BaseException | None = None  # a device failure that stopped this worker
        self._running: dict[str, set[asyncio.Task[None]]] = defaultdict(set)  # by stream
        self._stop = asyncio.Event()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, or until the device fails (then `fatal` says why)."""
        self._stop = stop
        await self._until_redis(lambda: self.queue.ensure_group(self.name), stop)
        log.info("worker %s serving %s", self.name, self.keys.prefix)
        try:
            async with (
                beside(self._beat_forever),
                beside(watch_engine, self.executor.stalled_s, self.config.engine_stall_s,
                       self._stop_if_fatal),  # fmt: skip
                beside(self.housekeeping.sweep_forever),
                beside(self.housekeeping.scan_forever),
                beside(self.housekeeping.listen_forever),
            ):
                await self._serve(stop)
                if self.fatal is None:  # a graceful stop finishes the jobs in progress
                    await self._drain()
        finally:
            for task in self._tasks():  # cancelled (killed): the jobs stay unacknowledged
                task.cancel()
            with contextlib.suppress(RedisError, OSError):
                await self.heartbeats.remove(self.name)
            log.info("worker %s stopped after %d jobs", self.name, self.jobs_done)

    def _stop_if_fatal(self, exc: BaseException) -> bool:
        """A device failure (CUDA error) stops the worker, so that its orchestrator restarts
        it; its job stays unacknowledged for another worker. True when `exc` is one."""
        if not is_device_failure(exc):
            return False
        log.critical("worker %s: the device failed (%s); stopping", self.name, exc)
        self.fatal = exc
        self._stop.set()
        return True

    async def _serve(self, stop: asyncio.Event) -> None:
        own_pending_done = False
        while not stop.is_set():
            raise_if_cancelled()
            try:
                if not own_pending_done:
                    self._start_all(await self.queue.read_own_pending(self.name))
                    own_pending_done = True
                self._start_all(await self.take_overs.due(self._free()[QUERY]))
                free = self._free()
                if any(n > 0 for n in free.values()):
                    self._start_all(await self.queue.read_new(self.name, self.block_ms, free))
                else:  # every slot busy: wait for one (or the next claim round)
                    await asyncio.wait(self._tasks(), timeout=self.block_ms / 1000)
            except (RedisError, OSError) as exc:
                if "NOGROUP" in str(exc):  # Redis lost its data: make the streams again
                    log.warning("worker %s: job streams gone; recreating them", self.name)
                    self.housekeeping.rescan()  # and the records of the stored contexts
                    with contextlib.suppress(RedisError, OSError):
                        await self.queue.ensure_group(self.name)
                    continue
                log.warning("worker %s: Redis failed (%s); retrying in 1 s", self.name, exc)
                await sleep_or_stop(stop, 1.0)

    def _free(self) -> dict[str, int]:
        busy = Counter(self.queue.kind_of(s) for s, tasks in self._running.items() for _ in tasks)
        return {kind: n - busy[kind] for kind, n in self.slots.items()}

    def _tasks(self) -> set[asyncio.Task[None]]:
        return set().union(*self._running.values())

    async def _drain(self) -> None:
        while tasks := self._tasks():
            await asyncio.wait(tasks)

    async def _until_redis(self, call: Callable[[], object], stop: asyncio.Event) -> None:
        while not stop.is_set():
            raise_if_cancelled()
            try:
                await call()  # type: ignore[misc]
                return
            except (RedisError, OSError) as exc:
                log.warning("worker %s: Redis unreachable (%s); retrying", self.name, exc)
                await sleep_or_stop(stop, 1.0)

    def _start_all(self, deliveries: list[Delivery]) -> None:
        taken_over = [d.entry_id for d in deliveries if d.deliveries > 1]
        if taken_over:
            log.info("worker %s: taking over %s", self.name, ", ".join(taken_over))
        for delivery in deliveries:
            task = asyncio.create_task(self._handle_logged(delivery), name=delivery.entry_id)
            self._running[delivery.stream].add(task)
            task.add_done_callback(self._running[delivery.stream].discard)

    async def _handle_logged(self, delivery: Delivery) -> None:
        try:
            await self.handle(delivery)
        except (RedisError, OSError) as exc:  # left unacknowledged: retried after a claim
            log.warning("worker %s: entry %s: Redis failed (%s)", self.name, delivery.entry_id, exc)

    async def handle(self, delivery: Delivery) -> None:
        """Run one delivered entry (or dead-letter it); nothing if it is no longer ours."""
        if not await self.queue.owns(delivery, self.name):
            log.info("worker %s: %s was claimed by another worker", self.name, delivery.entry_id)
            return
        if delivery.fields is None:  # deleted while pending: nothing to run
            await self.queue.ack(delivery)
            return
        try:
            job = delivery.job()
        except MalformedJobError as exc:
            await self.queue.dead_letter(delivery, str(exc), self.name)
            return
        if delivery.deliveries > self.config.max_deliveries:
            reason = delivered_too_often(delivery.deliveries, self.config.max_deliveries)
            log.error("worker %s: dead-lettering %s: %s", self.name, delivery.entry_id, reason)
            if isinstance(job, IngestJob):
                await self.ingests.dead_letter(delivery, job, reason)
            else:
                await self.queries.dead_letter(delivery, job, reason)
            return
        async with beside(self._keep_alive, delivery):
            if isinstance(job, IngestJob):
                done = await self.ingests.ingest(delivery, job)
            else:
                done = await self.queries.answer(delivery, job)
        self.jobs_done += int(done)

    async def _keep_alive(self, done: asyncio.Event, delivery: Delivery) -> None:
        while not await sleep_or_stop(done, self.config.claim_idle_s / 3) and not self.fatal:
            with contextlib.suppress(RedisError, OSError):
                if not await self.queue.keep_alive(delivery, self.name):
                    log.warning(
                        "worker %s: lost %s to another worker", self.name, delivery.entry_id
                    )
                    return

    # -- heartbeat -----------------------------------------------------------------------------

    def _beat_now(self) -> WorkerBeat:
        running = sorted(t.get_name() for t in self._tasks())
        own = len(self._running[self.keys.direct(self.name)])  # counted by the API itself
        free = 0 if self._stop.is_set() else max(0, self._free()[QUERY] + own)
        return replace(
            self.beat,
            beat_at=time.time(),
            jobs_done=self.jobs_done,
            current=running[0] if running else None,
            own_slots=free,
            resident=self.executor.resident_ids(RESIDENT_PUBLISHED),
        )

    async def _beat_forever(self, done: asyncio.Event) -> None:
        await beat_forever(done, self.heartbeats, self._beat_now, self.config.heartbeat_ttl_s / 3)
