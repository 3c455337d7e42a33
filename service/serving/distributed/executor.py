"""EngineExecutor: runs a worker's jobs on one engine, over the shared tiers.

Both verbs are the shared `Pipeline`'s (the embedded service runs the same code): ingest
encodes, compresses and commits the blob and a READY record into the shared store
(memory -> Redis -> disk: disk first, then Redis); answer streams from that stored record.

The stored records never expire by themselves (`expire_time` None on the worker's own
record: in distributed mode the Redis record owns expiry, and the workers' sweep purges the
bytes, `purge`). The stored object describes the record as the API registered it, expiry
included, so `restore` gives that record back when Redis lost it; and the stored bytes expire
from the disk tier with the context (its expiry when the worker ran the job, moved later when
a query finds it extended), so that the disk tier drops them by itself when the sweep is
behind, and evicts them first when it is full.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis

from service.config import ServiceConfig
from service.engine.kvzip_engine import KVzipEngine
from service.errors import ContextNotFoundError
from service.serving.distributed.jobs import IngestJob, QueryJob
from service.serving.distributed.protocol import Progress
from service.serving.engine_thread import EngineWorker
from service.serving.pipeline import Pipeline
from service.serving.records import ContextRecord, blob_key, is_blob_key
from service.serving.registry import ContextRegistry, processing_record, time_left
from service.serving.resident import ResidentContexts
from service.serving.validation import validated_create
from service.types import CreateContextRequest, QueryEvent
from storage import TieredStore, TierUnavailableError, build_store


def build_shared_store(config: ServiceConfig, client: Redis) -> TieredStore:
    """Memory LRU -> Redis tier on `client` (every key with the TTL) -> disk under the shared
    data dir (at most `disk_capacity_bytes`, evicting blobs only)."""
    return build_store(
        memory_bytes=config.memory_cache_bytes,
        disk_root=Path(config.data_dir) / "contexts",
        redis=client,
        redis_prefix=config.distributed.redis_prefix,
        redis_ttl_s=config.distributed.redis_ttl_s,
        disk_capacity_bytes=config.disk_capacity_bytes,
        disk_evictable=is_blob_key,
    )


class EngineExecutor:
    """The engine side of a worker (see service.serving.distributed.stream_worker.Executor)."""

    def __init__(self, config: ServiceConfig, engine: KVzipEngine, store: TieredStore) -> None:
        self.config, self.store = config, store
        self.thread = EngineWorker(config.queue_size)
        self.resident = ResidentContexts(config.memory_cache_bytes)
        self.registry = ContextRegistry(store, owns_expiry=False)
        self.pipeline = Pipeline(config, engine, self.registry, self.thread, self.resident)
        self.identity = dict(self.pipeline.identity)
        self.device = str(engine.model.device)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        hung = self.thread.stalled_s() > 0  # a call still running now never returns
        if not hung:
            await self.pipeline.close()
        await asyncio.to_thread(self.thread.close, not hung)

    async def ingest(
        self, job: IngestJob, progress: Progress, registered: ContextRecord | None = None
    ) -> tuple[ContextRecord, tuple[str, ...]]:
        ttl_s = time_left(registered.expire_time) if registered is not None else None
        record = await self.registry.ready(job.context_id)  # an earlier attempt finished it
        if record is None:
            record = await self._compute(job, progress, registered, ttl_s)
        elif ttl_s is not None:
            await self.registry.retain(job.context_id, ttl_s)
        return record, await self._tiers(job.context_id)

    async def _compute(
        self,
        job: IngestJob,
        progress: Progress,
        registered: ContextRecord | None,
        ttl_s: float | None,
    ) -> ContextRecord:
        request = CreateContextRequest(
            job.text, job.display_name, job.compression, job.tenant, job.system
        )
        checked = validated_create(request, self.config)
        doc = await self.pipeline.encode(checked)
        base = processing_record(job.context_id, checked, self.identity["model"])
        if registered is not None:  # the object describes the registration's times
            base = replace(
                base, create_time=registered.create_time, expire_time=registered.expire_time
            )
        return await self.pipeline.ingest(
            lambda: base, doc, checked.compression, progress, ttl_s=ttl_s
        )

    def resident_ids(self, limit: int) -> list[str]:
        return self.resident.ids(limit)

    async def answer(
        self, job: QueryJob, expire_time: str | None = None
    ) -> AsyncIterator[QueryEvent]:
        if (ttl_s := time_left(expire_time)) is not None:  # extended since it was stored?
            await self.registry.retain(job.context_id, ttl_s)
        record = await self.registry.record(job.context_id, job.request.tenant)
        if record is None:
            raise ContextNotFoundError(job.context_id)
        answer = self.pipeline.answer(record, job.request)
        async with contextlib.aclosing(answer):  # type: ignore[type-var]
            async for event in answer:
                yield event

    async def purge(self, context_id: str) -> None:
        await self.pipeline.purge(context_id)

    async def forget(self, context_id: str) -> None:
        await self.registry.forget(context_id)

    async def restore(self, context_id: str) -> tuple[ContextRecord, tuple[str, ...]] | None:
        record = await self.registry.described(context_id)
        if record is None and (record := await self.registry.ready(context_id)) is not None:
            # an object written before objects described their records: the record this
            # worker stored beside it, living no longer than any registration could
            created = datetime.fromisoformat(record.create_time)
            latest = created + timedelta(seconds=self.config.max_ttl_s)
            record = replace(record, expire_time=latest.isoformat())
        return None if record is None else (record, await self._tiers(context_id))

    async def stored_ids(self) -> list[str]:
        return await self.registry.stored_ids()

    def stalled_s(self) -> float:
        return self.thread.stalled_s()

    async def _tiers(self, context_id: str) -> tuple[str, ...]:
        """The shared tiers (not this process's memory) that hold the blob."""
        held = []
        for tier in self.store.tiers:
            if tier.name == "memory":
                continue
            with contextlib.suppress(TierUnavailableError):
                if await tier.exists(blob_key(context_id)):
                    held.append(tier.name)
        return tuple(held)
