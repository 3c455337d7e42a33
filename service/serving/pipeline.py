"""The data path of one engine, the same in both modes.

    ingest:  document ─► tokens ─► length check ─► engine.ingest (prefill, score, select;
             on the engine thread) ─► codec ─► registry.commit (blob, then record) ─► resident
    answer:  READY record ─► hold (ContextHolds: decoded contexts within the KV budget)
             ─► resident or tiers ─► decode ─► (re-select) ─► question tokens
             ─► window check ─► generate on the engine thread ─► text deltas ─► QueryResult

The stored object describes its record (records.describe), so the record can be rebuilt
from the object alone.

The embedded service and a distributed worker's executor both call these; neither writes
any step of it again. Requests reach it validated (service.serving.validation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from service import codec, telemetry
from service.config import CompressionConfig, ServiceConfig
from service.engine.fingerprints import FORMAT_VERSION
from service.engine.kvcache import CompressedContext
from service.engine.kvzip_engine import Document, IngestTimings, KVzipEngine
from service.engine.prompt import PromptLayout, build_layout, question_ids
from service.engine.tensor_blob import ByteSource
from service.errors import (
    CorruptContextError,
    DocumentTooLongError,
    QuestionTooLongError,
)
from service.serving.engine_thread import EngineWorker
from service.serving.holds import ContextHolds, decoded_bytes
from service.serving.ids import context_id, legacy_context_id
from service.serving.records import READY, ContextRecord, describe
from service.serving.registry import ContextRegistry
from service.serving.resident import ResidentContexts
from service.serving.scheduler import Scheduler
from service.serving.textstream import TextStream
from service.serving.validation import CheckedCreate, checked_query_ratio
from service.types import QueryEvent, QueryRequest, QueryResult, QueryTimings, Turn

log = logging.getLogger(__name__)

Progress = Callable[[float], None]
CLOSE_SETTLE_S = 10.0
"""At close, how long copies into shared tiers started by reads may still run."""
LAYOUTS = 256
"""Prompt layouts kept (one per system instruction, least recently used dropped)."""


class IngestAborted(Exception):
    """The context was deleted while its ingest ran: nothing of it is kept."""


class Pipeline:
    """Ingest and answer over one engine, its thread, a registry and the resident cache."""

    def __init__(
        self,
        config: ServiceConfig,
        engine: KVzipEngine,
        registry: ContextRegistry,
        thread: EngineWorker,
        resident: ResidentContexts,
    ) -> None:
        self.config, self.engine, self.registry = config, engine, registry
        self.thread, self.resident = thread, resident
        registry.on_purge.append(resident.drop)
        if engine.model.device.type == "cpu":  # decoded contexts are in host memory already
            registry.keep_no_bytes_in_memory()
        self.scheduler = Scheduler(engine.model, engine.eos_ids, thread, config.batching)
        batching = config.batching
        self.holds = ContextHolds(batching.kv_budget_bytes, batching.queue_size)
        self.identity = {
            "model": engine.identity.name,
            "model_fingerprint": engine.identity.model_fingerprint,
            "tokenizer_fingerprint": engine.identity.tokenizer_fingerprint,
            "format_version": FORMAT_VERSION,
        }
        self._layouts: OrderedDict[str | None, PromptLayout] = OrderedDict()
        self._layouts_lock = threading.Lock()  # question_ids runs in worker threads
        self._loading: dict[str, asyncio.Future[CompressedContext]] = {}

    async def close(self) -> None:
        """Stop the scheduler (requests still waiting get no more tokens); let the copies
        into shared tiers that reads started finish (at most a few seconds)."""
        await self.scheduler.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.registry.store.settle(), CLOSE_SETTLE_S)

    # -- ingest ------------------------------------------------------------------------------

    def context_id(self, checked: CheckedCreate) -> str:
        request = checked.request
        return context_id(
            self.identity, checked.compression, request.tenant, request.system, request.text
        )

    def legacy_id(self, checked: CheckedCreate, doc: Document) -> str:
        """The id the embedded service of versions before 0.2 gave this registration."""
        tenant = checked.request.tenant
        return legacy_context_id(self.identity, checked.compression, doc.all_ids, tenant)

    async def encode(self, checked: CheckedCreate) -> Document:
        """The document's tokens; InvalidInputError / DocumentTooLongError before any work."""
        await asyncio.to_thread(self.engine.check_method, checked.compression.method)
        request = checked.request
        doc = await asyncio.to_thread(self.engine.encode_document, request.text, request.system)
        limit = self.config.max_document_tokens
        if limit is not None and len(doc.context_ids) > limit:
            raise DocumentTooLongError(len(doc.context_ids), limit)
        window = self.engine.max_context_tokens
        if len(doc.all_ids) > window:
            raise DocumentTooLongError(len(doc.all_ids), window)
        return doc

    async def ingest(
        self,
        current: Callable[[], ContextRecord],
        doc: Document,
        compression: CompressionConfig,
        progress: Progress,
        aborted: Callable[[], bool] = lambda: False,
        ttl_s: float | None = None,
    ) -> ContextRecord:
        """Compress `doc`, store it and commit its READY record; the record.

        current: the context's record as it is now (its expiry may change meanwhile).
        aborted: true once the context was deleted; then nothing is kept (IngestAborted).
        ttl_s: how long the stored bytes live in the tiers (None: until the record is
        purged; a worker passes the time left to the context, see ContextRegistry.commit).
        """
        def progressed(fraction: float) -> None:  # on the engine thread: it is not hung
            self.thread.touch()
            progress(fraction)

        ctx, timings = await self.thread.run(self.engine.ingest, doc, compression, progressed)
        started = time.perf_counter()
        scheme, group = compression.quantization, compression.group_size
        described = describe(ready_record(current(), ctx, 0))  # the object tells its record
        blob = await asyncio.to_thread(
            codec.encode, ctx, self.engine.identity, scheme, group, described
        )
        if compression.quantization != "none":  # resident = what a later load decodes
            ctx = await self._decoded(blob)
        await self._abort_if(aborted, current().id)
        record = ready_record(current(), ctx, len(blob))
        await self.registry.commit(record, blob, ttl_s)
        while (expire := current().expire_time) != record.expire_time:  # PATCHed meanwhile
            record = replace(record, expire_time=expire)
            await self.registry.put(record)
        await self._abort_if(aborted, record.id)
        self.resident.put(record.id, ctx)
        _observe_ingest(timings, time.perf_counter() - started, record)
        log.info(
            "context %s ready: %d tokens, kept %.3f, %d bytes",
            record.id,
            ctx.context_len,
            ctx.kept_pairs / max(ctx.total_pairs, 1),
            len(blob),
        )
        return record

    async def _abort_if(self, aborted: Callable[[], bool], cid: str) -> None:
        if aborted():
            await self.purge(cid)
            raise IngestAborted(cid)

    async def purge(self, cid: str) -> None:
        """Remove a context from every tier and from the device."""
        await self.registry.purge(cid)

    # -- answer ------------------------------------------------------------------------------

    async def load(self, cid: str) -> CompressedContext:
        """The decoded context: resident, or read (memory-mapped from disk when there) and
        decoded off the engine thread, so the batch keeps decoding meanwhile. Concurrent
        loads of one context share one read."""
        if (ctx := self.resident.get(cid)) is not None:
            return ctx
        if (loading := self._loading.get(cid)) is None:
            loading = asyncio.ensure_future(self._read(cid))
            self._loading[cid] = loading
            loading.add_done_callback(lambda _: self._loading.pop(cid, None))
        return await asyncio.shield(loading)

    async def _read(self, cid: str) -> CompressedContext:
        """Read and decode, the decode running while the stored bytes' checksum is checked
        (the result is kept only when they pass; a damaged copy is replaced by another
        tier's and decoded again); a blob no tier holds intact, or one that does not parse,
        makes the context lost (FAILED, see ContextRegistry.lost)."""
        pending = await self.registry.open_blob(cid)
        if pending is None:
            raise await self.registry.lost(cid, "no tier holds an intact copy any more")
        decoding = asyncio.ensure_future(self._decoded(pending.data))
        try:
            blob = await pending.settled
        except BaseException:
            await _dropped(decoding)
            raise
        if blob is not pending.data:  # damaged: decoded again from the copy that replaced it
            await _dropped(decoding)
            if blob is None:
                raise await self.registry.lost(cid, "no tier holds an intact copy any more")
            decoding = asyncio.ensure_future(self._decoded(blob))
        try:
            ctx = await decoding
        except CorruptContextError as exc:
            raise await self.registry.lost(cid, f"the stored object does not parse: {exc}") from exc
        self.resident.put(cid, ctx)
        return ctx

    async def _decoded(self, blob: ByteSource) -> CompressedContext:
        """A stored object on the model's device in its dtype (dequantized there), decoded
        off the engine thread; the prefix rows an object leaves out come from the engine."""
        ids = codec.prefix_ids(blob)
        prefix = await self.thread.run(self.engine.prefix_context, ids) if ids else None
        return await asyncio.to_thread(self._decode, blob, prefix)

    def _decode(self, blob: ByteSource, prefix: CompressedContext | None) -> CompressedContext:
        device, dtype = self.engine.model.device, self.engine.model.dtype
        return codec.decode(blob, self.engine.identity, device, dtype, prefix)

    def question_ids(
        self,
        system: str | None,
        question: str,
        instructions: str = "",
        history: tuple[Turn, ...] = (),
    ) -> list[int]:
        """The question side of the prompt in the layout the context was ingested with (its
        system prompt): the request's instructions, earlier turns, then the question."""
        return question_ids(
            self._layout(system), self.engine.tokenizer, question, instructions, history
        )

    def _layout(self, system: str | None) -> PromptLayout:
        """The prompt layout of `system`, from an LRU of LAYOUTS (tenants choose `system`)."""
        with self._layouts_lock:
            layout = self._layouts.pop(system, None)
        if layout is None:
            layout = build_layout(self.engine.tokenizer, system)
        with self._layouts_lock:
            self._layouts[system] = layout
            while len(self._layouts) > LAYOUTS:
                self._layouts.popitem(last=False)
        return layout

    async def _prepared(
        self, record: ContextRecord, request: QueryRequest
    ) -> tuple[CompressedContext, list[int], float]:
        """The context to attend to, the prompt ids and the load seconds."""
        checked_query_ratio(
            request.ratio, record.method, record.ratio, self.config.kvzip_head_min_ratio
        )
        t0 = time.perf_counter()
        ctx = await self.load(record.id)
        if request.ratio is not None:  # query-time ratio: re-select the stored scores
            ctx = await self.thread.run(self.engine.reselect, ctx, request.ratio)
        load_s = time.perf_counter() - t0
        prompt = await asyncio.to_thread(
            self.question_ids,
            record.system,
            request.question,
            request.instructions,
            request.history,
        )
        budget = self.engine.max_positions - ctx.seq_len - request.sampling.max_new_tokens
        if len(prompt) > budget:
            raise QuestionTooLongError(len(prompt), max(budget, 0))
        return ctx, prompt, load_s

    async def answer(
        self, record: ContextRecord, request: QueryRequest
    ) -> AsyncIterator[QueryEvent]:
        """Text deltas as tokens arrive, then one event with the QueryResult.

        Waits first until the context may be held (ContextHolds: QueueFullError when too
        many wait). Stops at the first stop sequence (left out of the answer). Closing this
        iterator early (the client went away) stops the generation at its next token.
        """
        size = decoded_bytes(record, self.engine.model.dtype.itemsize)
        async with (
            self.holds.hold(record.id, size),
            contextlib.aclosing(self._answer(record, request)) as events,
        ):
            async for event in events:
                yield event

    async def _answer(
        self, record: ContextRecord, request: QueryRequest
    ) -> AsyncGenerator[QueryEvent, None]:
        start = time.perf_counter()
        ctx, prompt, load_s = await self._prepared(record, request)
        text = TextStream(self.engine.decode, request.sampling.stop)
        ttft = 0.0
        tokens: list[int] = []
        generation = self.scheduler.generate(ctx, prompt, request.sampling)
        try:
            async with contextlib.aclosing(generation):  # closed early: the engine stops too
                async for token in generation:
                    ttft = ttft or time.perf_counter() - start
                    tokens.append(token)
                    telemetry.GENERATED_TOKENS.inc()
                    if delta := text.push(tokens):
                        yield QueryEvent(delta=delta)
                    if text.stopped:
                        break
        except (GeneratorExit, asyncio.CancelledError):
            telemetry.QUERIES_CANCELLED.inc()
            raise
        if tail := text.flush():
            yield QueryEvent(delta=tail)
        total = time.perf_counter() - start
        ttft = ttft or total
        cached = record.prefix_tokens + record.context_tokens
        stopped = text.stopped or len(tokens) < request.sampling.max_new_tokens
        result = QueryResult(
            answer=text.text,
            prompt_tokens=cached + len(prompt),
            completion_tokens=len(tokens),
            cached_tokens=cached,
            timings=QueryTimings(load_s, ttft, max(total - ttft, 0.0)),
            finish_reason="stop" if stopped else "length",
        )
        yield QueryEvent(result=result)


def ready_record(base: ContextRecord, ctx: CompressedContext, nbytes: int) -> ContextRecord:
    """`base` (the PROCESSING record) READY with the stored context's stats."""
    return replace(
        base,
        state=READY,
        context_tokens=ctx.context_len,
        prefix_tokens=ctx.prefix_len,
        method=ctx.method,
        ratio=ctx.ratio,
        chunk_size=ctx.chunk_size,
        kept_kv_pairs=ctx.kept_pairs,
        total_kv_pairs=ctx.total_pairs,
        bytes=nbytes,
        bytes_full_bf16=full_bf16_bytes(ctx),
        progress=1.0,
        error=None,
    )


def full_bf16_bytes(ctx: CompressedContext) -> int:
    """What the full, unevicted cache takes in bf16: 2 bytes x (K, V) x layers x KV heads x
    head_dim x (prefix + context) tokens."""
    layer = ctx.layers[0]
    return 2 * 2 * len(ctx.layers) * layer.n_heads * layer.keys.shape[1] * ctx.seq_len


def _observe_ingest(timings: IngestTimings, store_s: float, record: ContextRecord) -> None:
    for phase in ("prefill", "scoring", "selection"):
        telemetry.INGEST_PHASE_SECONDS.labels(phase).observe(getattr(timings, f"{phase}_s"))
    telemetry.INGEST_PHASE_SECONDS.labels("store").observe(store_s)
    telemetry.CONTEXT_TOKENS.observe(record.context_tokens)
    if record.total_kv_pairs:
        telemetry.COMPRESSION_KEPT_RATIO.observe(record.kept_kv_pairs / record.total_kv_pairs)


async def _dropped(task: asyncio.Future[Any]) -> None:
    """Wait for `task` to end and drop what it gave, an exception included."""
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved, so never reported as lost
