"""Ingest jobs on a worker: the executor compresses and stores the document while its
progress is mirrored into the Redis record; the record turns READY or FAILED once (counted
in `kvzip_ingests_total{outcome}`, as the embedded service counts its ingests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.exceptions import RedisError

from service import telemetry
from service.errors import EngineUnavailableError, ServiceError
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
        loaded = await self.queue.document(delivery, job)
        if loaded is None:
            gone = EngineUnavailableError(
                "the document of this registration was gone from Redis before a worker took "
                "it; register it again"
            )
            await self.records.mark_failed(cid, error_payload(gone), self.name)
            await self.queue.ack(delivery)
            return False
        progress = Fraction()
        try:
            async with beside(self._mirror_progress, cid, progress):
                record, tiers = await self.executor.ingest(loaded, progress.set, current.record)
        except ServiceError as exc:
            log.info("worker %s: context %s failed: %s", self.name, cid, exc)
            await self.records.mark_failed(cid, error_payload(exc), self.name)
            await self.queue.ack(delivery)
            telemetry.INGESTS.labels("failed").inc()
            return False
        except Exception as exc:
            if not self.on_fatal(exc):
                log.exception("worker %s: ingest of %s failed; left for a retry", self.name, cid)
            return False
        if await self.records.mark_ready(cid, record, tiers, self.name):
            log.info("worker %s: context %s READY (%d bytes)", self.name, cid, record.bytes)
            telemetry.INGESTS.labels("ready").inc()
        elif await self.records.get(cid) is None:  # deleted while it ran: purge the bytes
            await self.records.schedule_purge(cid)
            telemetry.INGESTS.labels("aborted").inc()
        await self.queue.ack(delivery)
        return True

    async def dead_letter(self, delivery: Delivery, job: IngestJob, reason: str) -> None:
        """Give up on `job`: its context FAILED with `reason`, the entry dead-lettered."""
        failure = error_payload(EngineUnavailableError(reason))
        await self.records.mark_failed(job.context_id, failure, self.name)
        await self.queue.dead_letter(delivery, reason, self.name)

    async def _mirror_progress(self, done: asyncio.Event, cid: str, progress: Fraction) -> None:
        shown = 0.0
        while not await sleep_or_stop(done, self.progress_interval_s):
            if progress.value > shown:
                shown = progress.value
                with contextlib.suppress(RedisError, OSError):
                    await self.records.set_progress(cid, round(min(shown, 0.99), 4))
