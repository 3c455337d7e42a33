"""Query jobs on a worker: the answer streams into the request's reply stream, token by
token, while the asker is there (a cancel key stops it); errors go into that stream too.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from redis.exceptions import RedisError

from service.errors import (
    ContextLostError,
    ContextNotFoundError,
    ContextNotReadyError,
    EngineUnavailableError,
    ServiceError,
    public_message,
)
from service.serving.distributed.jobs import (
    DELTA,
    ERROR,
    RESULT,
    START,
    QueryJob,
    Reply,
    error_payload,
)
from service.serving.distributed.protocol import Executor
from service.serving.distributed.redis_records import READY, RecordStore
from service.serving.distributed.transport import Delivery, JobQueue, ReplyWriter

log = logging.getLogger(__name__)


class QueryJobs:
    """Answers query jobs through an executor (see StreamWorker)."""

    def __init__(
        self,
        queue: JobQueue,
        records: RecordStore,
        executor: Executor,
        name: str,
        on_fatal: Callable[[BaseException], bool],
    ) -> None:
        self.queue, self.records = queue, records  # the worker's own
        self.client, self.keys = queue.client, queue.keys
        self.executor, self.name, self.on_fatal = executor, name, on_fatal

    def reply_writer(self, job: QueryJob, attempt: str) -> ReplyWriter:
        ttl = max(60.0, job.deadline - time.time() + 60.0)
        return ReplyWriter(self.client, self.keys.reply(job.request_id), attempt, ttl)

    async def answer(self, delivery: Delivery, job: QueryJob) -> bool:
        """Answer `job` into its reply stream; True once acknowledged as done."""
        if time.time() > job.deadline or await self._cancelled(job):
            await self.queue.ack(delivery)  # nobody waits for this answer any more
            return False
        started = time.perf_counter()
        writer = self.reply_writer(job, f"{self.name}:{uuid.uuid4().hex[:12]}")
        await writer.send(Reply(START, writer.attempt))
        try:
            expire_time = await self._check_answerable(job)
            await self._stream(job, writer, expire_time)
        except ServiceError as exc:
            exc = await self._maybe_lost(job, exc)
            await writer.send(Reply(ERROR, writer.attempt, error=error_payload(exc)))
        except (RedisError, OSError):
            raise  # the reply cannot be written: leave the entry for a retry
        except Exception as exc:
            if self.on_fatal(exc):
                return False  # unacknowledged: another worker answers it
            log.exception("worker %s: query %s failed", self.name, job.request_id)
            error = EngineUnavailableError(public_message(exc, "answering"))
            await writer.send(Reply(ERROR, writer.attempt, error=error_payload(error)))
        await self.queue.ack(delivery)
        log.info(
            "worker %s: query %s on %s answered in %.2f s (delivery %d)",
            self.name,
            job.request_id,
            job.context_id,
            time.perf_counter() - started,
            delivery.deliveries,
        )
        return True

    async def dead_letter(self, delivery: Delivery, job: QueryJob, reason: str) -> None:
        """Give up on `job`: the asker gets an error with `reason`, the entry is
        dead-lettered."""
        writer = self.reply_writer(job, "dead-letter")
        failure = error_payload(EngineUnavailableError(reason))
        await writer.send(Reply(ERROR, writer.attempt, error=failure))
        await self.queue.dead_letter(delivery, reason, self.name)

    async def _check_answerable(self, job: QueryJob) -> str | None:
        """The context's expiry; ContextNotFoundError / ContextNotReadyError unless READY."""
        current = await self.records.get(job.context_id)
        if current is None or not current.record.visible_to(job.request.tenant):
            raise ContextNotFoundError(job.context_id)
        if current.state != READY:
            raise ContextNotReadyError(f"context {job.context_id!r} is {current.state}")
        return current.record.expire_time

    async def _stream(self, job: QueryJob, writer: ReplyWriter, expire_time: str | None) -> None:
        events = self.executor.answer(job, expire_time)
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

    async def _maybe_lost(self, job: QueryJob, exc: ServiceError) -> ServiceError:
        """A READY context whose bytes no tier holds any more turns FAILED, with why; the
        error to answer (ContextLostError then)."""
        if isinstance(exc, ContextLostError):
            lost = exc
        elif isinstance(exc, ContextNotFoundError):
            lost = ContextLostError(job.context_id, "no tier holds it any more")
        else:
            return exc
        failed = await self.mark_lost(job.context_id, lost)
        return lost if failed or lost is exc else exc

    async def mark_lost(self, context_id: str, error: ContextLostError) -> bool:
        """READY -> FAILED with why (its stored cache is gone: evicted, or damaged in every
        tier; also the hook the executor's registry calls); True when it was READY."""
        try:
            return await self.records.mark_failed(
                context_id, error_payload(error), self.name, from_state=READY
            )
        except (RedisError, OSError) as exc:  # its next query finds out again
            log.warning("worker %s: could not fail lost %s: %s", self.name, context_id, exc)
            return False
