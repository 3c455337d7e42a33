"""The embedded context service: model, storage and records in one process.

The data path is the shared `Pipeline` (engine work on its one thread), records and blobs
in a `ContextRegistry`. A context is PROCESSING while it ingests, then READY (blob, then
record: the commit point), or FAILED (also once its stored cache was lost) until registered
again. An expired context is a 404, purged on lookup and by a periodic sweep, which first
rebuilds lost records from the objects that describe them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime

from service.config import ServiceConfig
from service.engine.kvzip_engine import Document, KVzipEngine
from service.errors import (
    ContextLostError,
    ContextNotFoundError,
    ContextNotReadyError,
    EngineUnavailableError,
)
from service.serving.engine_thread import EngineWorker
from service.serving.inflight import InFlight, Ingest
from service.serving.pipeline import IngestAborted, Pipeline
from service.serving.quota import check_quota
from service.serving.records import FAILED, ContextRecord, paginate
from service.serving.registry import ContextRegistry, local_store, processing_record
from service.serving.resident import ResidentContexts
from service.serving.validation import (
    CheckedCreate,
    checked_expiry,
    validated_create,
    validated_query,
)
from service.types import (
    ContextInfo,
    ContextPage,
    CreateContextRequest,
    QueryEvent,
    QueryRequest,
    QueryResult,
)
from storage import DiskTier, TieredStore

log = logging.getLogger(__name__)


class EmbeddedContextService:
    """ContextService with the engine in this process (see service.facade)."""

    def __init__(
        self, config: ServiceConfig, store: TieredStore, engine: KVzipEngine | None = None
    ) -> None:
        self.config, self.store, self.engine = config, store, engine
        self.model_name = config.engine.model
        self.worker = EngineWorker(config.queue_size)
        self.registry = ContextRegistry(store)
        self.resident = ResidentContexts(config.memory_cache_bytes)
        self.inflight = InFlight()
        self._admission = asyncio.Lock()
        self._pipeline: Pipeline | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.engine is None:
            self.engine = await self.worker.run(KVzipEngine.load, self.config.engine)
        self.model_name = self.engine.identity.name
        self._pipeline = Pipeline(
            self.config, self.engine, self.registry, self.worker, self.resident
        )
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._pipeline is not None:
            await self._pipeline.close()
        tasks = self.inflight.abort_all()
        await asyncio.to_thread(self.worker.close)
        await asyncio.gather(*tasks, return_exceptions=True)

    def is_ready(self) -> bool:
        """The model is loaded and the durable tier's folder is there."""
        durable = self.store.durable
        return self._pipeline is not None and (
            not isinstance(durable, DiskTier) or durable.root.is_dir()
        )

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise EngineUnavailableError("the model is not loaded yet")
        return self._pipeline

    # -- creating contexts ----------------------------------------------------------------

    async def create_context(self, request: CreateContextRequest) -> tuple[ContextInfo, bool]:
        checked = validated_create(request, self.config)
        pipeline = self.pipeline
        doc = await pipeline.encode(checked)
        cid = pipeline.context_id(checked)
        for known in (cid, pipeline.legacy_id(checked, doc)):  # ids of older versions too
            record = await self.registry.record(known, request.tenant)
            if record is None or record.state == FAILED:  # FAILED: ingest it again
                continue
            if kept := await self.registry.extend(record, checked.ttl_s):
                return kept.info(), False
        async with self._admission:  # the quota check and the in-flight slot it grants
            running = self.inflight.get(cid, request.tenant)
            created = running is None or running.record.state == FAILED
            if running is None or created:
                in_flight = [i.record for i in self.inflight.visible(request.tenant)]
                check_quota(self.config, await self.registry.usage(request.tenant, in_flight))
                running = self._add_ingest(cid, doc, checked)
        await asyncio.sleep(0)  # a new task takes its queue slot (or is refused) before we answer
        future = running.future
        if future.done() and not future.cancelled() and (error := future.exception()):
            raise error
        if not request.wait:
            return running.info(), created
        return await asyncio.shield(future), created

    def _add_ingest(self, cid: str, doc: Document, checked: CheckedCreate) -> Ingest:
        model = self.pipeline.engine.identity.name
        record = processing_record(cid, checked, model, len(doc.context_ids), len(doc.prefix_ids))
        ingest = self.inflight.add(record, waited=checked.request.wait)
        ingest.task = asyncio.create_task(self._run_ingest(ingest, doc, checked))
        return ingest

    async def _run_ingest(self, ingest: Ingest, doc: Document, checked: CheckedCreate) -> None:
        """The ingest task: settles the in-flight entry, never raises."""
        try:
            record = await self.pipeline.ingest(
                lambda: ingest.record, doc, checked.compression, ingest.set_progress,
                lambda: ingest.aborted,
            )  # fmt: skip
        except asyncio.CancelledError:
            self.inflight.settle(ingest, asyncio.CancelledError())
        except Exception as exc:
            aborted = isinstance(exc, IngestAborted) or ingest.aborted
            self.inflight.settle(ingest, ContextNotFoundError(ingest.record.id) if aborted else exc)
        else:
            self.inflight.settle(ingest, record.info())

    # -- reading, listing, updating, deleting ---------------------------------------------

    async def _require(self, cid: str, tenant: str, *, ready: bool = True) -> ContextRecord:
        """The stored record (READY unless `ready` is False: ContextLostError for a lost
        one), ContextNotReadyError while in flight, else ContextNotFoundError."""
        if (ingest := self.inflight.get(cid, tenant)) is not None:
            raise ContextNotReadyError(ingest.not_ready_reason())
        record = await self.registry.record(cid, tenant)
        if record is None:
            raise ContextNotFoundError(cid)
        if ready and record.state == FAILED:
            raise ContextLostError(cid, message=record.error)
        return record

    async def get_context(self, context_id: str, tenant: str = "") -> ContextInfo:
        if (ingest := self.inflight.get(context_id, tenant)) is not None:
            return ingest.info()
        return (await self._require(context_id, tenant, ready=False)).info()

    async def delete_context(self, context_id: str, tenant: str = "") -> None:
        ingest = self.inflight.get(context_id, tenant)
        if ingest is not None:  # stop it at its next scoring chunk
            self.inflight.abort(ingest)
        record = await self.registry.record(context_id, tenant)
        if ingest is None and record is None:
            raise ContextNotFoundError(context_id)
        await self.pipeline.purge(context_id)

    async def update_context(
        self, context_id: str, expire_time: datetime, tenant: str = ""
    ) -> ContextInfo:
        expire = checked_expiry(expire_time, self.config.max_ttl_s).isoformat()
        if (ingest := self.inflight.get(context_id, tenant)) is not None:
            ingest.set_expiry(expire)
            return ingest.info()
        await self._require(context_id, tenant, ready=False)
        record = await self.registry.update(
            context_id, tenant, lambda current: replace(current, expire_time=expire)
        )  # under the context's lock: a DELETE cannot land between the read and the write
        if record is None:
            raise ContextNotFoundError(context_id)
        return record.info()

    async def list_contexts(
        self, tenant: str = "", page_size: int = 50, page_token: str | None = None
    ) -> ContextPage:
        found = {r.id: r.info() for r in await self.registry.records(tenant)}
        found.update({i.record.id: i.info() for i in self.inflight.visible(tenant)})
        return paginate(found.values(), page_size, page_token)

    async def purge_expired(self) -> int:
        """Purge every expired context from every tier; returns how many stored ones went."""
        purged = await self.registry.purge_expired()
        self.inflight.drop_expired()
        return purged

    async def _sweep_forever(self) -> None:
        """Rebuild the records lost from disk, then purge expired contexts now and then."""
        await _logged(self.registry.restore_missing, "records rebuilt from stored objects")
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            await _logged(self.purge_expired, "expired contexts purged")

    # -- queries ------------------------------------------------------------------------

    async def stream_query(
        self, context_id: str, request: QueryRequest
    ) -> AsyncIterator[QueryEvent]:
        """Text deltas as tokens arrive, then one event with the QueryResult (see
        Pipeline.answer). Closing this iterator early stops the generation."""
        request = validated_query(request, self.config)
        record = await self._require(context_id, request.tenant)
        answer = self.pipeline.answer(record, request)
        async with contextlib.aclosing(answer):  # type: ignore[type-var]
            async for event in answer:
                yield event

    async def query(self, context_id: str, request: QueryRequest) -> QueryResult:
        result = None
        async for event in self.stream_query(context_id, request):
            result = event.result or result
        assert result is not None
        return result


async def _logged(step: Callable[[], Awaitable[int]], what: str) -> None:
    try:
        if done := await step():
            log.info("%s: %d", what, done)
    except Exception:
        log.exception("%s: failed", what)


def build_embedded_service(
    config: ServiceConfig, engine: KVzipEngine | None = None
) -> EmbeddedContextService:
    """The factory app/ imports lazily inside its lifespan (tests pass a ready engine)."""
    return EmbeddedContextService(config, local_store(config), engine)
