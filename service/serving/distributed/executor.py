"""EngineExecutor: runs a worker's jobs on one engine, over the shared tiers.

Ingest uses the engine's own verbs (encode, ingest with progress, codec) and writes the
blob and then a READY `service.serving.records.ContextRecord` into the shared store (memory ->
Redis -> disk: disk first, then Redis), exactly the layout the embedded service reads.
Queries are answered by an `EmbeddedContextService` core over that same store, so decoding,
stop sequences, usage and timings are the embedded mode's code, not a copy.

The stored records never expire by themselves (`expire_time` None): in distributed mode the
Redis record owns expiry, and the workers' sweep purges the bytes (`purge`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from redis.asyncio import Redis

from service import codec
from service.config import ServiceConfig
from service.engine.fingerprints import FORMAT_VERSION
from service.engine.kvzip_engine import Document, KVzipEngine
from service.errors import DocumentTooLongError
from service.serving.distributed.jobs import IngestJob, QueryJob
from service.serving.distributed.stream_worker import Progress
from service.serving.embedded import EmbeddedContextService
from service.serving.records import ContextRecord, blob_key, record_key
from service.types import QueryEvent
from storage import TieredStore, TierUnavailableError, build_store


def build_shared_store(config: ServiceConfig, client: Redis) -> TieredStore:
    """Memory LRU -> Redis tier on `client` (every key with the TTL) -> disk under the shared
    data dir."""
    return build_store(
        memory_bytes=config.memory_cache_bytes,
        disk_root=Path(config.data_dir) / "contexts",
        redis=client,
        redis_prefix=config.distributed.redis_prefix,
        redis_ttl_s=config.distributed.redis_ttl_s,
    )


class EngineExecutor:
    """The engine side of a worker (see service.serving.distributed.stream_worker.Executor)."""

    def __init__(self, config: ServiceConfig, engine: KVzipEngine, store: TieredStore) -> None:
        self.config = config
        self.engine = engine
        self.store = store
        self.core = EmbeddedContextService(config, engine=engine)
        self.core.store = store  # the core reads what the workers write, from every tier
        self.identity = {
            "model": engine.identity.name,
            "model_fingerprint": engine.identity.model_fingerprint,
            "tokenizer_fingerprint": engine.identity.tokenizer_fingerprint,
            "format_version": FORMAT_VERSION,
        }
        self.device = str(engine.model.device)

    async def start(self) -> None:
        await self.core.start()

    async def close(self) -> None:
        await self.core.close()

    async def ingest(
        self, job: IngestJob, progress: Progress
    ) -> tuple[ContextRecord, tuple[str, ...]]:
        record = await self._stored(job.context_id)
        if record is None:
            record = await self._compute(job, progress)
        return record, await self._tiers(job.context_id)

    def answer(self, job: QueryJob) -> AsyncIterator[QueryEvent]:
        return self.core.stream_query(job.context_id, job.request)

    async def purge(self, context_id: str) -> None:
        await self.store.delete(record_key(context_id))  # invisible first, then the bytes
        await self.store.delete(blob_key(context_id))
        self.core.resident.drop(context_id)

    # -- internals ---------------------------------------------------------------------------

    async def _stored(self, context_id: str) -> ContextRecord | None:
        """The READY record of a context already stored (an earlier attempt finished it)."""
        data = await self.store.get(record_key(context_id))
        if data is None or not await self.store.exists(blob_key(context_id)):
            return None
        return ContextRecord.from_json(data)

    async def _compute(self, job: IngestJob, progress: Progress) -> ContextRecord:
        engine = self.engine
        await asyncio.to_thread(engine.check_method, job.compression.method)
        doc = await asyncio.to_thread(engine.encode_document, job.text, job.system)
        self._check_length(doc)
        ctx = await self.core.worker.run(engine.ingest, doc, job.compression, progress)
        blob = await asyncio.to_thread(codec.encode, ctx, engine.identity)
        record = ContextRecord(
            id=job.context_id,
            tenant=job.tenant,
            display_name=job.display_name,
            model=engine.identity.name,
            state="READY",
            create_time=datetime.now(UTC).isoformat(),
            context_tokens=ctx.context_len,
            prefix_tokens=ctx.prefix_len,
            method=ctx.method,
            ratio=ctx.ratio,
            chunk_size=ctx.chunk_size,
            kept_kv_pairs=ctx.kept_pairs,
            total_kv_pairs=ctx.total_pairs,
            bytes=len(blob),
            system=job.system,
        )
        await self.store.put(blob_key(job.context_id), blob)
        await self.store.put(record_key(job.context_id), record.to_json())  # the commit point
        self.core.resident.put(job.context_id, ctx)
        return record

    def _check_length(self, doc: Document) -> None:
        limit = self.config.max_document_tokens
        if limit is not None and len(doc.context_ids) > limit:
            raise DocumentTooLongError(len(doc.context_ids), limit)
        if len(doc.all_ids) > self.engine.max_context_tokens:
            raise DocumentTooLongError(len(doc.all_ids), self.engine.max_context_tokens)

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
