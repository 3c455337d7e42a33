"""Ingest jobs on a worker: the executor compresses and stores the document while its
progress is mirrored into the Redis record; the record turns READY or FAILED once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.exceptions import RedisError

from service.errors import ServiceError
from service.serving.distributed.jobs import IngestJob, error_payload
from service.serving.distributed.loops import Fraction, beside, sleep_or_stop
from service.serving.distributed.protocol import Executor
from service.serving.distributed.redis_records import PROCESSING, RecordStore
from service.serving.distributed.transport import Delivery, JobQueue

log = logging.getLogger(__name__)


class IngestJobs:
    """Runs ingest jobs through an executor (see StreamWorker)."""

    def __init__(
        self,
        queue: JobQueue,
        records: RecordStore,
        executor: Executor,
        name: str,
        on_fatal: Callable[[BaseException], bool],
        progress_interval_s: float,
    ) -> None:
        self.queue, self.records = queue, records  # the worker's own
        self.executor, self.name, self.on_fatal = executor, name, on_fatal
        self.progress_interval_s = progress_interval_s

    async def ingest(self, delivery: Delivery, job: IngestJob) -> bool:
        """Ingest `job`'s document; True once READY and acknowledged."""
        cid = job.context_id
        current = await self.records.get(cid)
        if current is None or current.state != PROCESSING:
            await self.queue.ack(delivery)  # deleted, expired or already done: idempotent
            return False
        progress = Fraction()
        try:
            async with beside(self._mirror_progress, cid, progress):
                record, tiers = await self.executor.ingest(job, progress.set, current.record)
        except ServiceError as exc:
            log.info("worker %s: context %s failed: %s", self.name, cid, exc)
            await self.records.mark_failed(cid, error_payload(exc), self.name)
            await self.queue.ack(delivery)
            return False
        except Exception as exc:
            if not self.on_fatal(exc):
                log.exception("worker %s: ingest of %s failed; left for a retry", self.name, cid)
            return False
        if await self.records.mark_ready(cid, record, tiers, self.name):
            log.info("worker %s: context %s READY (%d bytes)", self.name, cid, record.bytes)
        elif await self.records.get(cid) is None:  # deleted while it ran: purge the bytes
            await self.records.schedule_purge(cid)
        await self.queue.ack(delivery)
        return True

    async def _mirror_progress(self, done: asyncio.Event, cid: str, progress: Fraction) -> None:
        shown = 0.0
        while not await sleep_or_stop(done, self.progress_interval_s):
            if progress.value > shown:
                shown = progress.value
                with contextlib.suppress(RedisError, OSError):
                    await self.records.set_progress(cid, round(min(shown, 0.99), 4))
