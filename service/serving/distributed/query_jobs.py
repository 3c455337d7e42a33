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
            await self._check_answerable(job)
            await self._stream(job, writer)
        except ServiceError as exc:
            await self._maybe_lost(job, exc)
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
