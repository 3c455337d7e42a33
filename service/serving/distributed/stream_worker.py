"""StreamWorker: the job loop of one worker process (no torch here; the engine work is done
by an `Executor`, see service.serving.distributed.executor).

    start ─► own pending entries (after a restart) ─► loop:
               every claim_idle_s/2: XAUTOCLAIM entries idle > claim_idle_s (dead workers)
               XREADGROUP one new entry per stream (queries first), block ≤ block_ms
             each entry: delivered > max_deliveries? ─► dead letter (+ context FAILED)
                         else run it, keeping it alive; ACK only once the result is durable

An ingest whose record is no longer PROCESSING (READY already, deleted, expired) is
acknowledged without work: jobs are idempotent, so at-least-once delivery never duplicates
a context. A domain error (document too long...) fails the context at once; any other
error leaves the entry unacknowledged, to be retried by whichever worker claims it next,
at most `max_deliveries` times in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.config import DistributedConfig
from service.errors import (
    ContextNotFoundError,
    ContextNotReadyError,
    EngineUnavailableError,
    ServiceError,
)
from service.serving.distributed.heartbeat import Heartbeats, WorkerBeat
from service.serving.distributed.jobs import (
    DELTA,
    ERROR,
    RESULT,
    START,
    IngestJob,
    MalformedJobError,
    QueryJob,
    Reply,
    error_payload,
)
from service.serving.distributed.keys import RedisKeys
from service.serving.distributed.redis_records import PROCESSING, READY, RecordStore
from service.serving.distributed.transport import Delivery, JobQueue, ReplyWriter
from service.serving.records import ContextRecord
from service.types import QueryEvent

log = logging.getLogger(__name__)

Progress = Callable[[float], None]
_FATAL_MARKERS = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "NCCL error")


class Executor(Protocol):
    """What a worker needs from the engine side."""

    identity: dict[str, str]
    device: str

    async def ingest(
        self, job: IngestJob, progress: Progress
    ) -> tuple[ContextRecord, tuple[str, ...]]:
        """Compute (or find stored) and durably store the context; its READY record and the
        tiers that hold it. Raises a ServiceError for a document that can never succeed."""

    def answer(self, job: QueryJob) -> AsyncIterator[QueryEvent]:
        """The answer as text deltas, then one event with the result."""

    async def purge(self, context_id: str) -> None:
        """Remove the context's bytes from every tier."""


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
    ) -> None:
        self.client, self.keys, self.config = client, keys, config
        self.executor, self.name = executor, name
        self.queue = JobQueue(client, keys)
        self.records = RecordStore(client, keys)
        self.heartbeats = Heartbeats(client, keys, config.heartbeat_ttl_s)
        self.block_ms = block_ms
        self.progress_interval_s = progress_interval_s
        self.sweep_interval_s = sweep_interval_s
        self.beat = WorkerBeat(name, executor.identity, device=executor.device)
        self.jobs_done = 0
        self.fatal: BaseException | None = None  # a device failure that stopped this worker
        self._current: str | None = None
        self._stop = asyncio.Event()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, or until the device fails (then `fatal` says why)."""
        self._stop = stop
        await self._until_redis(self.queue.ensure_group, stop)
        log.info("worker %s serving %s", self.name, self.keys.prefix)
        try:
            async with _helper(self._beat_forever), _helper(self._sweep_forever):
                await self._serve(stop)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await self.heartbeats.remove(self.name)
            log.info("worker %s stopped after %d jobs", self.name, self.jobs_done)

    def _stop_if_fatal(self, exc: BaseException) -> bool:
        """A device failure (CUDA error) stops the worker, so that its orchestrator restarts
        it; its job stays unacknowledged for another worker. True when `exc` is one."""
        text = str(exc)
        if not (isinstance(exc, RuntimeError) and any(m in text for m in _FATAL_MARKERS)):
            return False
        log.critical("worker %s: the device failed (%s); stopping", self.name, text)
        self.fatal = exc
        self._stop.set()
        return True

    async def _serve(self, stop: asyncio.Event) -> None:
        own_pending_done = False
        next_claim = 0.0
        while not stop.is_set():
            _raise_if_cancelled()
            try:
                if not own_pending_done:
                    await self._handle_all(await self.queue.read_own_pending(self.name))
                    own_pending_done = True
                if time.monotonic() >= next_claim:
                    idle_ms = int(self.config.claim_idle_s * 1000)
                    await self._handle_all(await self.queue.claim_idle(self.name, idle_ms))
                    next_claim = time.monotonic() + self.config.claim_idle_s / 2
                await self._handle_all(await self.queue.read_new(self.name, self.block_ms))
            except (RedisError, OSError) as exc:
                log.warning("worker %s: Redis failed (%s); retrying in 1 s", self.name, exc)
                await _sleep_or_stop(stop, 1.0)

    async def _until_redis(self, call: Callable[[], object], stop: asyncio.Event) -> None:
        while not stop.is_set():
            _raise_if_cancelled()
            try:
                await call()  # type: ignore[misc]
                return
            except (RedisError, OSError) as exc:
                log.warning("worker %s: Redis unreachable (%s); retrying", self.name, exc)
                await _sleep_or_stop(stop, 1.0)

    async def _handle_all(self, deliveries: list[Delivery]) -> None:
        taken_over = [d.entry_id for d in deliveries if d.deliveries > 1]
        if taken_over:
            log.info("worker %s: taking over %s", self.name, ", ".join(taken_over))
        for delivery in deliveries:
            await self.handle(delivery)

    async def handle(self, delivery: Delivery) -> None:
        """Run one delivered entry (or dead-letter it)."""
        if delivery.fields is None:  # deleted while pending: nothing to run
            await self.queue.ack(delivery)
            return
        try:
            job = delivery.job()
        except MalformedJobError as exc:
            await self.queue.dead_letter(delivery, str(exc), self.name)
            return
        if delivery.deliveries > self.config.max_deliveries:
            await self._dead_letter(delivery, job)
            return
        self._current = delivery.entry_id
        try:
            async with _helper(self._keep_alive, delivery):
                if isinstance(job, IngestJob):
                    await self._ingest(delivery, job)
                else:
                    await self._answer(delivery, job)
        finally:
            self._current = None

    async def _dead_letter(self, delivery: Delivery, job: IngestJob | QueryJob) -> None:
        reason = (
            f"the job was delivered {delivery.deliveries} times (at most "
            f"{self.config.max_deliveries} allowed) without completing: the workers that "
            "took it crashed or hung"
        )
        log.error("worker %s: dead-lettering %s: %s", self.name, delivery.entry_id, reason)
        failure = error_payload(EngineUnavailableError(reason))
        if isinstance(job, IngestJob):
            await self.records.mark_failed(job.context_id, failure, self.name)
        else:
            writer = self._reply_writer(job, "dead-letter")
            await writer.send(Reply(ERROR, writer.attempt, error=failure))
        await self.queue.dead_letter(delivery, reason, self.name)

    async def _keep_alive(self, done: asyncio.Event, delivery: Delivery) -> None:
        while not await _sleep_or_stop(done, self.config.claim_idle_s / 3):
            with contextlib.suppress(RedisError, OSError):
                await self.queue.keep_alive(delivery, self.name)

    # -- ingest ------------------------------------------------------------------------------

    async def _ingest(self, delivery: Delivery, job: IngestJob) -> None:
        cid = job.context_id
        current = await self.records.get(cid)
        if current is None or current.state != PROCESSING:
            await self.queue.ack(delivery)  # deleted, expired or already done: idempotent
            return
        progress = _Progress()
        try:
            async with _helper(self._mirror_progress, cid, progress):
                record, tiers = await self.executor.ingest(job, progress.set)
        except ServiceError as exc:
            log.info("worker %s: context %s failed: %s", self.name, cid, exc)
            await self.records.mark_failed(cid, error_payload(exc), self.name)
            await self.queue.ack(delivery)
            return
        except Exception as exc:
            if not self._stop_if_fatal(exc):
                log.exception("worker %s: ingest of %s failed; left for a retry", self.name, cid)
            return
        if await self.records.mark_ready(cid, record, tiers, self.name):
            log.info("worker %s: context %s READY (%d bytes)", self.name, cid, record.bytes)
        elif await self.records.get(cid) is None:  # deleted while it ran: purge the bytes
            await self.records.schedule_purge(cid)
        await self.queue.ack(delivery)
        self.jobs_done += 1

    async def _mirror_progress(self, done: asyncio.Event, cid: str, progress: _Progress) -> None:
        shown = 0.0
        while not await _sleep_or_stop(done, self.progress_interval_s):
            if progress.value > shown:
                shown = progress.value
                with contextlib.suppress(RedisError, OSError):
                    await self.records.set_progress(cid, round(min(shown, 0.99), 4))

    # -- queries -----------------------------------------------------------------------------

    def _reply_writer(self, job: QueryJob, attempt: str) -> ReplyWriter:
        ttl = max(60.0, job.deadline - time.time() + 60.0)
        return ReplyWriter(self.client, self.keys.reply(job.request_id), attempt, ttl)

    async def _answer(self, delivery: Delivery, job: QueryJob) -> None:
        if time.time() > job.deadline or await self._cancelled(job):
            await self.queue.ack(delivery)  # nobody waits for this answer any more
            return
        started = time.perf_counter()
        writer = self._reply_writer(job, f"{self.name}:{uuid.uuid4().hex[:12]}")
        await writer.send(Reply(START, writer.attempt))
        try:
            await self._check_answerable(job)
            await self._stream(job, writer)
        except ServiceError as exc:
            await self._maybe_lost(job, exc)
            await writer.send(Reply(ERROR, writer.attempt, error=error_payload(exc)))
        except (RedisError, OSError):
            raise  # the reply cannot be written: leave the entry for a retry
        except Exception as exc:
            if self._stop_if_fatal(exc):
                return  # unacknowledged: another worker answers it
            log.exception("worker %s: query %s failed", self.name, job.request_id)
            error = EngineUnavailableError(f"the worker failed to answer: {exc!r}")
            await writer.send(Reply(ERROR, writer.attempt, error=error_payload(error)))
        await self.queue.ack(delivery)
        self.jobs_done += 1
        log.info(
            "worker %s: query %s on %s answered in %.2f s (delivery %d)",
            self.name,
            job.request_id,
            job.context_id,
            time.perf_counter() - started,
            delivery.deliveries,
        )

    async def _check_answerable(self, job: QueryJob) -> None:
        current = await self.records.get(job.context_id)
        if current is None or not current.record.visible_to(job.request.tenant):
            raise ContextNotFoundError(job.context_id)
        if current.state != READY:
            raise ContextNotReadyError(f"context {job.context_id!r} is {current.state}")

    async def _stream(self, job: QueryJob, writer: ReplyWriter) -> None:
        events = self.executor.answer(job)
        next_check = time.monotonic() + 0.2
        try:
            async for event in events:
                if event.delta:
                    await writer.send(Reply(DELTA, writer.attempt, delta=event.delta))
                if event.result is not None:
                    await writer.send(Reply(RESULT, writer.attempt, result=event.result))
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.2
                    if await self._cancelled(job):
                        log.info("worker %s: query %s cancelled", self.name, job.request_id)
                        return
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def _cancelled(self, job: QueryJob) -> bool:
        return bool(await self.client.exists(self.keys.cancel(job.request_id)))

    async def _maybe_lost(self, job: QueryJob, exc: ServiceError) -> None:
        """A READY context whose bytes no tier holds any more: fail it, with why."""
        if not isinstance(exc, ContextNotFoundError):
            return
        reason = ContextNotReadyError(
            f"context {job.context_id!r} lost its stored cache (no tier holds it); "
            "register the document again"
        )
        await self.records.mark_failed(
            job.context_id, error_payload(reason), self.name, from_state=READY
        )

    # -- heartbeat and expiry sweep ----------------------------------------------------------

    async def _beat_forever(self, done: asyncio.Event) -> None:
        while not done.is_set():
            beat = replace(
                self.beat, beat_at=time.time(), jobs_done=self.jobs_done, current=self._current
            )
            try:
                await self.heartbeats.beat(beat)
            except (RedisError, OSError) as exc:
                log.warning("worker %s: heartbeat failed: %s", self.name, exc)
            await _sleep_or_stop(done, self.config.heartbeat_ttl_s / 3)

    async def _sweep_forever(self, done: asyncio.Event) -> None:
        while not done.is_set():
            try:
                await self.sweep()
            except (RedisError, OSError) as exc:
                log.warning("worker %s: expiry sweep failed: %s", self.name, exc)
            except Exception:
                log.exception("worker %s: expiry sweep failed", self.name)
            await _sleep_or_stop(done, self.sweep_interval_s)

    async def sweep(self) -> int:
        """Purge the bytes of every expired or deleted context (each by one worker)."""
        now = time.time()
        purged = 0
        for cid in await self.records.due(now):
            current = await self.records.get(cid)
            if current is not None and not current.record.expired():
                await self.records.reschedule(current)
                continue
            if await self.records.claim_purge(cid, now):
                if current is not None:
                    await self.client.delete(self.keys.context(cid))
                await self.executor.purge(cid)
                purged += 1
        if purged:
            log.info("worker %s: purged %d expired or deleted contexts", self.name, purged)
        return purged


class _Progress:
    """The fraction scored, written by the engine thread and read on the loop."""

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, fraction: float) -> None:
        self.value = fraction


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` or until `stop` is set; True when it is set (not `wait_for`, which on
    Python 3.11 drops a cancellation that lands as `stop` is set: CPython gh-86296)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


def _raise_if_cancelled() -> None:
    """Raise the cancellation of this task that redis-py lost (it writes each command under
    `asyncio.wait_for`); a loop that only waits on Redis would otherwise never end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@contextlib.asynccontextmanager
async def _helper(
    loop: Callable[..., Coroutine[Any, Any, None]], *args: object
) -> AsyncIterator[None]:
    """Run `loop(done, *args)` beside the body; on exit set `done` and let it finish its
    current step. Never cancelled mid-command: a Redis call cut off by a cancellation can
    leave its connection out of step."""
    done = asyncio.Event()
    task = asyncio.create_task(loop(done, *args))
    try:
        yield
    finally:
        done.set()
        await asyncio.gather(task, return_exceptions=True)
