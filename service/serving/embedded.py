"""The embedded context service: model, storage and records in one process.

FastAPI calls the coroutines below on the event loop; every model call goes to the
EngineWorker thread; storage is a TieredStore (memory LRU -> disk).

A context's life: `create_context` encodes the document (an optional system instruction
joins the protected prefix, so it is part of the content-hash id) and starts an ingest task.
While it runs the context is PROCESSING, in memory, with the fraction of tokens scored; the
blob and then the READY record are stored (the record is the commit point). An ingest nobody
waited for that fails stays visible as FAILED until it expires or is deleted. The record
owns the expiry: an expired context answers 404 and is purged from every tier, on lookup
and by a periodic sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from service import codec, telemetry
from service.config import CompressionConfig, ServiceConfig
from service.engine.fingerprints import context_id
from service.engine.kvcache import CompressedContext
from service.engine.kvzip_engine import Document, KVzipEngine
from service.engine.prompt import PromptLayout, build_layout, question_ids
from service.errors import (
    ContextNotFoundError,
    ContextNotReadyError,
    DocumentTooLongError,
    EngineUnavailableError,
    InvalidInputError,
    QueueFullError,
)
from service.serving.engine_thread import EngineWorker
from service.serving.records import (
    ContextRecord,
    blob_key,
    paginate,
    record_key,
)
from service.serving.resident import ResidentContexts
from service.serving.textstream import TextStream
from service.serving.validation import checked_expiry, validated_compression
from service.types import (
    ANY_TENANT,
    ContextInfo,
    ContextPage,
    CreateContextRequest,
    QueryEvent,
    QueryRequest,
    QueryResult,
    QueryTimings,
    SamplingParams,
)
from storage import DiskTier, MemoryTier, TieredStore

log = logging.getLogger(__name__)

PROCESSING, READY, FAILED = "PROCESSING", "READY", "FAILED"


class _Aborted(Exception):
    """Raised from the progress callback to stop the ingest of a context deleted meanwhile."""


@dataclass
class _Ingest:
    """A context being ingested (PROCESSING), or whose unwaited ingest failed (FAILED)."""

    record: ContextRecord
    future: asyncio.Future[ContextInfo]
    waited: bool
    progress: float = 0.0  # written by the engine thread, read on the loop
    aborted: bool = False
    task: asyncio.Task[None] | None = None

    def info(self) -> ContextInfo:
        if self.record.state == PROCESSING:
            return replace(self.record, progress=self.progress).info()
        return self.record.info()


class EmbeddedContextService:
    """ContextService with the engine in this process (see service.facade)."""

    def __init__(self, config: ServiceConfig, engine: KVzipEngine | None = None) -> None:
        self.config = config
        self.engine = engine
        self.model_name = config.engine.model
        self.worker = EngineWorker(config.queue_size)
        self.disk = DiskTier(config.data_dir / "contexts")
        memory = MemoryTier(config.memory_cache_bytes)
        self.store = TieredStore([memory, self.disk])
        self.resident = ResidentContexts(config.memory_cache_bytes)
        for tier, name in ((memory, "memory"), (self.disk, "disk"), (self.resident, "resident")):
            telemetry.track_tier(name, tier)
        self._ingests: dict[str, _Ingest] = {}
        self._layouts: dict[str, PromptLayout] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.engine is None:
            self.engine = await self.worker.run(KVzipEngine.load, self.config.engine)
        self.model_name = self.engine.identity.name
        self.engine.head_scores_dir = self.config.data_dir / "head_scores"  # kvzip_head
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for ingest in self._ingests.values():
            ingest.aborted = True
        await asyncio.to_thread(self.worker.close)
        tasks = [i.task for i in self._ingests.values() if i.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def is_ready(self) -> bool:
        """The model is loaded and the disk tier's folder is there."""
        return self.engine is not None and self.disk.root.is_dir()

    def _engine(self) -> KVzipEngine:
        if self.engine is None:
            raise EngineUnavailableError("the model is not loaded yet")
        return self.engine

    # -- creating contexts ----------------------------------------------------------------

    async def create_context(self, request: CreateContextRequest) -> tuple[ContextInfo, bool]:
        engine = self._engine()
        compression = validated_compression(request.compression)
        await asyncio.to_thread(engine.check_method, compression.method)
        ttl = self._ttl(request.ttl_seconds)
        if request.tenant == ANY_TENANT:
            raise InvalidInputError(f"tenant {ANY_TENANT!r} cannot own a context")
        if not request.text.strip():
            raise InvalidInputError("text must contain at least one non-whitespace character")
        doc = await asyncio.to_thread(engine.encode_document, request.text, request.system)
        self._check_length(doc)
        cid = context_id(engine.identity, compression, doc.all_ids, request.tenant)
        if (record := await self._record(cid, request.tenant)) is not None:
            return (await self._extend(record, ttl)).info(), False
        ingest = self._ingests.get(cid)
        if ingest is not None and ingest.record.state == PROCESSING:
            if not request.wait:
                return ingest.info(), False
            return await asyncio.shield(ingest.future), False
        return await self._start_ingest(cid, doc, compression, request, ttl), True

    def _ttl(self, ttl_seconds: float | None) -> float:
        ttl = self.config.default_ttl_s if ttl_seconds is None else ttl_seconds
        if not 0 < ttl <= self.config.max_ttl_s:
            raise InvalidInputError(
                f"ttl_seconds must be in (0, {self.config.max_ttl_s:g}]. Given: {ttl:g}"
            )
        return ttl

    def _check_length(self, doc: Document) -> None:
        limit = self.config.max_document_tokens
        if limit is not None and len(doc.context_ids) > limit:
            raise DocumentTooLongError(len(doc.context_ids), limit)
        window = self._engine().max_context_tokens
        if len(doc.all_ids) > window:
            raise DocumentTooLongError(len(doc.all_ids), window)

    async def _extend(self, record: ContextRecord, ttl: float) -> ContextRecord:
        """Registering a stored document again keeps it alive at least `ttl` more seconds."""
        wanted = datetime.now(UTC) + timedelta(seconds=ttl)
        if record.expire_time is None or datetime.fromisoformat(record.expire_time) >= wanted:
            return record
        record = replace(record, expire_time=wanted.isoformat())
        await self.store.put(record_key(record.id), record.to_json())
        return record

    async def _start_ingest(
        self,
        cid: str,
        doc: Document,
        compression: CompressionConfig,
        request: CreateContextRequest,
        ttl: float,
    ) -> ContextInfo:
        now = datetime.now(UTC)
        record = ContextRecord(
            id=cid,
            tenant=request.tenant,
            display_name=request.display_name,
            model=self._engine().identity.name,
            state=PROCESSING,
            create_time=now.isoformat(),
            context_tokens=len(doc.context_ids),
            prefix_tokens=len(doc.prefix_ids),
            method=compression.method,
            ratio=compression.ratio,
            chunk_size=compression.chunk_size,
            kept_kv_pairs=0,
            total_kv_pairs=0,
            bytes=0,
            expire_time=(now + timedelta(seconds=ttl)).isoformat(),
            progress=0.0,
            system=request.system,
        )
        future: asyncio.Future[ContextInfo] = asyncio.get_running_loop().create_future()
        ingest = _Ingest(record, future, waited=request.wait)
        self._ingests[cid] = ingest
        ingest.task = asyncio.create_task(self._run_ingest(cid, doc, compression, ingest))
        await asyncio.sleep(0)  # the task takes its queue slot (or is refused) before we answer
        if future.done() and not future.cancelled() and (error := future.exception()):
            raise error
        if not request.wait:
            return ingest.info()
        return await asyncio.shield(future)

    async def _run_ingest(
        self, cid: str, doc: Document, compression: CompressionConfig, ingest: _Ingest
    ) -> None:
        """The ingest task: settles `ingest.future` and the in-memory state, never raises."""
        try:
            info = await self._ingest(cid, doc, compression, ingest)
        except asyncio.CancelledError:
            telemetry.INGESTS.labels("aborted").inc()
            ingest.future.cancel()
            self._forget(cid, ingest)
        except Exception as exc:
            aborted = isinstance(exc, _Aborted) or ingest.aborted
            telemetry.INGESTS.labels("aborted" if aborted else "failed").inc()
            error = ContextNotFoundError(cid) if aborted else exc
            ingest.future.set_exception(error)
            ingest.future.exception()  # retrieved: waiters re-raise it, nobody else must
            if aborted or ingest.waited or isinstance(exc, QueueFullError):
                self._forget(cid, ingest)
            else:
                log.warning("context %s failed to ingest: %r", cid, exc)
                ingest.record = replace(ingest.record, state=FAILED, error=str(exc) or repr(exc))
        else:
            telemetry.INGESTS.labels("ready").inc()
            ingest.future.set_result(info)
            self._forget(cid, ingest)

    async def _ingest(
        self, cid: str, doc: Document, compression: CompressionConfig, ingest: _Ingest
    ) -> ContextInfo:
        engine = self._engine()

        def progress(fraction: float) -> None:  # engine thread, between scoring chunks
            if ingest.aborted:
                raise _Aborted(cid)
            ingest.progress = fraction

        def work() -> tuple[CompressedContext, object]:
            return engine.ingest(doc, compression, progress), engine.last_timings

        ctx, timings = await self.worker.run(work)  # the first await: admission happens here
        started = time.perf_counter()
        blob = await asyncio.to_thread(codec.encode, ctx, engine.identity)
        await self._abort_if_deleted(cid, ingest)
        await self.store.put(blob_key(cid), blob)
        record = replace(
            ingest.record,
            state=READY,
            context_tokens=ctx.context_len,
            prefix_tokens=ctx.prefix_len,
            method=ctx.method,
            ratio=ctx.ratio,
            chunk_size=ctx.chunk_size,
            kept_kv_pairs=ctx.kept_pairs,
            total_kv_pairs=ctx.total_pairs,
            bytes=len(blob),
            progress=1.0,
        )
        await self.store.put(record_key(cid), record.to_json())  # the commit point
        while ingest.record.expire_time != record.expire_time:  # PATCHed meanwhile
            record = replace(record, expire_time=ingest.record.expire_time)
            await self.store.put(record_key(cid), record.to_json())
        await self._abort_if_deleted(cid, ingest)
        self.resident.put(cid, ctx)
        _observe_ingest(timings, time.perf_counter() - started, record)
        log.info(
            "context %s ready: %d tokens, kept %.3f, %d bytes",
            cid,
            ctx.context_len,
            ctx.kept_pairs / max(ctx.total_pairs, 1),
            len(blob),
        )
        return record.info()

    async def _abort_if_deleted(self, cid: str, ingest: _Ingest) -> None:
        if ingest.aborted:
            await self._purge(cid)
            raise _Aborted(cid)

    def _forget(self, cid: str, ingest: _Ingest) -> None:
        if self._ingests.get(cid) is ingest:
            del self._ingests[cid]

    # -- reading, listing, updating, deleting ---------------------------------------------

    def _pending(self, cid: str, tenant: str) -> _Ingest | None:
        """The in-memory (PROCESSING or FAILED) context `cid`, if the tenant may see it."""
        ingest = self._ingests.get(cid)
        if ingest is None or not ingest.record.visible_to(tenant):
            return None
        if ingest.record.expired():
            ingest.aborted = True
            self._forget(cid, ingest)
            return None
        return ingest

    async def _record(self, cid: str, tenant: str) -> ContextRecord | None:
        """The stored record, if the tenant may see it; an expired one is purged on sight."""
        data = await self.store.get(record_key(cid))
        if data is None:
            return None
        record = ContextRecord.from_json(data)
        if not record.visible_to(tenant):
            return None
        if record.expired():
            await self._purge(cid)
            return None
        return record

    async def _purge(self, cid: str) -> None:
        """Remove a context from every tier: the record first (invisible), then the bytes."""
        await self.store.delete(record_key(cid))
        await self.store.delete(blob_key(cid))
        self.resident.drop(cid)

    async def _require(self, cid: str, tenant: str) -> ContextRecord:
        """The READY record, ContextNotReadyError while in memory, else ContextNotFoundError."""
        if (ingest := self._pending(cid, tenant)) is not None:
            if ingest.record.state == FAILED:
                raise ContextNotReadyError(f"context {cid!r} failed: {ingest.record.error}")
            raise ContextNotReadyError(
                f"context {cid!r} is still processing ({ingest.progress:.0%} of its tokens "
                "scored); retry when its state is READY"
            )
        record = await self._record(cid, tenant)
        if record is None:
            raise ContextNotFoundError(cid)
        return record

    async def get_context(self, context_id: str, tenant: str = "") -> ContextInfo:
        if (ingest := self._pending(context_id, tenant)) is not None:
            return ingest.info()
        return (await self._require(context_id, tenant)).info()

    async def delete_context(self, context_id: str, tenant: str = "") -> None:
        ingest = self._pending(context_id, tenant)
        if ingest is not None:  # stop it at its next scoring chunk
            ingest.aborted = True
            self._forget(context_id, ingest)
        record = await self._record(context_id, tenant)
        if ingest is None and record is None:
            raise ContextNotFoundError(context_id)
        await self._purge(context_id)

    async def update_context(
        self, context_id: str, expire_time: datetime, tenant: str = ""
    ) -> ContextInfo:
        expire = checked_expiry(expire_time, self.config.max_ttl_s).isoformat()
        if (ingest := self._pending(context_id, tenant)) is not None:
            ingest.record = replace(ingest.record, expire_time=expire)
            return ingest.info()
        record = replace(await self._require(context_id, tenant), expire_time=expire)
        await self.store.put(record_key(context_id), record.to_json())
        return record.info()

    async def list_contexts(
        self, tenant: str = "", page_size: int = 50, page_token: str | None = None
    ) -> ContextPage:
        found: dict[str, ContextInfo] = {}
        for key in await self.store.keys("ctx_"):
            if key.endswith(".json"):
                record = await self._record(key.removesuffix(".json"), tenant)
                if record is not None:
                    found[record.id] = record.info()
        for cid in list(self._ingests):
            if (ingest := self._pending(cid, tenant)) is not None:
                found[cid] = ingest.info()
        return paginate(found.values(), page_size, page_token)

    async def purge_expired(self) -> int:
        """Purge every expired context from every tier; returns how many stored ones went."""
        purged = 0
        for key in await self.store.keys("ctx_"):
            if key.endswith(".json"):
                cid = key.removesuffix(".json")
                data = await self.store.get(key)
                if data is not None and ContextRecord.from_json(data).expired():
                    await self._purge(cid)
                    purged += 1
        for cid in list(self._ingests):
            self._pending(cid, ANY_TENANT)  # drops the expired ones
        return purged

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                if purged := await self.purge_expired():
                    log.info("expiry sweep purged %d contexts", purged)
            except Exception:
                log.exception("expiry sweep failed")

    # -- queries ------------------------------------------------------------------------

    async def _load(self, cid: str) -> CompressedContext:
        """The decoded context: resident, or read through the tiers and decoded."""
        if (ctx := self.resident.get(cid)) is not None:
            return ctx
        blob = await self.store.get(blob_key(cid))
        if blob is None:
            raise ContextNotFoundError(cid)
        engine = self._engine()
        device, dtype = engine.model.device, engine.model.dtype
        ctx = await asyncio.to_thread(codec.decode, blob, engine.identity, device, dtype)
        self.resident.put(cid, ctx)
        return ctx

    def _question_ids(self, system: str | None, question: str) -> list[int]:
        """The question in the layout the context was ingested with (its system prompt)."""
        engine = self._engine()
        if not system:
            return engine.encode_question(question)
        if system not in self._layouts:
            self._layouts[system] = build_layout(engine.tokenizer, system)
        return question_ids(self._layouts[system], engine.tokenizer, question)

    def _check_query(self, ctx: CompressedContext, prompt: list[int], max_new: int) -> None:
        if max_new > self.config.max_new_tokens_limit:
            raise InvalidInputError(
                f"max_new_tokens must be <= {self.config.max_new_tokens_limit}. Given: {max_new}"
            )
        needed = ctx.seq_len + len(prompt) + max_new
        if needed > self._engine().max_positions:
            raise InvalidInputError(
                f"context ({ctx.seq_len}) + question ({len(prompt)}) + max_new_tokens "
                f"({max_new}) = {needed} tokens exceeds the model window "
                f"({self._engine().max_positions})"
            )

    async def stream_tokens(
        self, context_id: str, request: QueryRequest
    ) -> AsyncGenerator[tuple[list[int], float, int], None]:
        """Yield (token ids so far, load seconds, prompt tokens) per generated token."""
        record = await self._require(context_id, request.tenant)
        if not request.question.strip():
            raise InvalidInputError("question must contain at least one non-whitespace character")
        sampling = _checked_sampling(request.sampling)
        if request.ratio is not None and request.ratio > record.ratio + 1e-9:
            raise InvalidInputError(
                f"ratio must be <= the context's stored ratio ({record.ratio}). "
                f"Given: {request.ratio}"
            )
        engine = self._engine()
        t0 = time.perf_counter()
        ctx = await self._load(context_id)
        if request.ratio is not None:  # query-time ratio: re-select the stored scores
            ctx = await self.worker.run(engine.reselect, ctx, request.ratio)
        load_s = time.perf_counter() - t0
        prompt = await asyncio.to_thread(self._question_ids, record.system, request.question)
        self._check_query(ctx, prompt, sampling.max_new_tokens)
        tokens: list[int] = []
        generation = self.worker.stream(lambda: engine.generate(ctx, prompt, sampling))
        async with contextlib.aclosing(generation):  # closed early: the engine stops too
            async for token in generation:
                tokens.append(token)
                yield tokens, load_s, len(prompt)

    async def stream_query(
        self, context_id: str, request: QueryRequest
    ) -> AsyncIterator[QueryEvent]:
        """Text deltas as tokens arrive, then one event with the QueryResult.

        Stops at the first stop sequence (left out of the answer). Closing this iterator
        early (the client went away) stops the generation at its next token.
        """
        record = await self._require(context_id, request.tenant)
        engine = self._engine()
        text = TextStream(engine.decode, request.sampling.stop)
        start = time.perf_counter()
        ttft = load_s = 0.0
        tokens: list[int] = []
        prompt_len = 0
        generated = self.stream_tokens(context_id, request)
        try:
            async for tokens, load_s, prompt_len in generated:  # noqa: B007
                if not ttft:
                    ttft = time.perf_counter() - start
                telemetry.GENERATED_TOKENS.inc()
                if delta := text.push(tokens):
                    yield QueryEvent(delta=delta)
                if text.stopped:
                    break
        except (GeneratorExit, asyncio.CancelledError):
            telemetry.QUERIES_CANCELLED.inc()
            raise
        finally:
            await generated.aclose()
        if tail := text.flush():
            yield QueryEvent(delta=tail)
        total = time.perf_counter() - start
        if not tokens:  # nothing generated: count the question tokens directly
            prompt_len = len(
                await asyncio.to_thread(self._question_ids, record.system, request.question)
            )
        cached = record.prefix_tokens + record.context_tokens
        stopped = text.stopped or len(tokens) < request.sampling.max_new_tokens
        result = QueryResult(
            answer=text.text,
            prompt_tokens=cached + prompt_len,
            completion_tokens=len(tokens),
            cached_tokens=cached,
            timings=QueryTimings(load_s, ttft or total, max(total - (ttft or total), 0.0)),
            finish_reason="stop" if stopped else "length",
        )
        yield QueryEvent(result=result)

    async def query(self, context_id: str, request: QueryRequest) -> QueryResult:
        result: QueryResult | None = None
        async for event in self.stream_query(context_id, request):
            result = event.result or result
        assert result is not None
        return result


MIN_TEMPERATURE = 1e-5
"""Below this, sampling is greedy decoding (its limit); logits / T would overflow float32."""


def _checked_sampling(sampling: SamplingParams) -> SamplingParams:
    if sampling.max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be >= 1. Given: {sampling.max_new_tokens}")
    if sampling.temperature < 0:
        raise InvalidInputError(f"temperature must be >= 0. Given: {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise InvalidInputError(f"top_p must be in (0, 1]. Given: {sampling.top_p}")
    if 0 < sampling.temperature < MIN_TEMPERATURE:
        return replace(sampling, temperature=0.0)
    return sampling


def _observe_ingest(timings: object, store_s: float, record: ContextRecord) -> None:
    for phase in ("prefill", "scoring", "selection"):
        seconds = getattr(timings, f"{phase}_s", None)
        if seconds is not None:
            telemetry.INGEST_PHASE_SECONDS.labels(phase).observe(seconds)
    telemetry.INGEST_PHASE_SECONDS.labels("store").observe(store_s)
    telemetry.CONTEXT_TOKENS.observe(record.context_tokens)
    if record.total_kv_pairs:
        telemetry.COMPRESSION_KEPT_RATIO.observe(record.kept_kv_pairs / record.total_kv_pairs)


def build_embedded_service(config: ServiceConfig) -> EmbeddedContextService:
    """The factory app/ imports lazily inside its lifespan."""
    return EmbeddedContextService(config)
