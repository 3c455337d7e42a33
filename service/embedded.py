"""The embedded context service: model, storage and records in one process.

FastAPI calls the coroutines below on the event loop; every model call goes to the
EngineWorker thread; storage is a TieredStore (memory LRU -> disk).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from service import codec
from service.config import METHODS, CompressionConfig, ServiceConfig
from service.engine import Document, KVzipEngine
from service.errors import (
    ContextNotFoundError,
    DocumentTooLongError,
    EngineUnavailableError,
    InvalidInputError,
)
from service.identity import context_id
from service.kvcache import CompressedContext
from service.records import ContextRecord, blob_key, now_iso, record_key
from service.resident import ResidentContexts
from service.types import (
    ContextInfo,
    CreateContextRequest,
    QueryRequest,
    QueryResult,
    QueryTimings,
)
from service.worker import EngineWorker
from storage import DiskTier, MemoryTier, TieredStore

log = logging.getLogger(__name__)


class EmbeddedContextService:
    """ContextService with the engine in this process (see service.facade)."""

    def __init__(self, config: ServiceConfig, engine: KVzipEngine | None = None) -> None:
        self.config = config
        self.engine = engine
        self.model_name = config.engine.model
        self.worker = EngineWorker(config.queue_size)
        self.store = TieredStore(
            [
                MemoryTier(config.memory_cache_bytes),
                DiskTier(config.data_dir / "contexts"),
            ]
        )
        self.resident = ResidentContexts(config.memory_cache_bytes)
        self._inflight: dict[str, asyncio.Future[ContextInfo]] = {}

    async def start(self) -> None:
        if self.engine is None:
            self.engine = await self.worker.run(KVzipEngine.load, self.config.engine)
        self.model_name = self.engine.identity.name

    async def close(self) -> None:
        await asyncio.to_thread(self.worker.close)

    def is_ready(self) -> bool:
        return self.engine is not None

    def _engine(self) -> KVzipEngine:
        if self.engine is None:
            raise EngineUnavailableError("the model is not loaded yet")
        return self.engine

    # -- contexts -----------------------------------------------------------------------

    async def create_context(self, request: CreateContextRequest) -> tuple[ContextInfo, bool]:
        engine = self._engine()
        compression = _validated(request.compression)
        if not request.text.strip():
            raise InvalidInputError("text must contain at least one non-whitespace character")
        doc = await asyncio.to_thread(engine.encode_document, request.text)
        if len(doc.all_ids) > engine.max_context_tokens:
            raise DocumentTooLongError(len(doc.all_ids), engine.max_context_tokens)
        cid = context_id(engine.identity, compression, doc.all_ids, request.tenant)
        if (record := await self._record(cid, request.tenant)) is not None:
            return record.info(), False
        if cid in self._inflight:  # the same document is being ingested right now
            return await asyncio.shield(self._inflight[cid]), False
        future: asyncio.Future[ContextInfo] = asyncio.get_running_loop().create_future()
        self._inflight[cid] = future
        try:
            info = await self._ingest(cid, doc, compression, request)
            future.set_result(info)
            return info, True
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[cid]

    async def _ingest(
        self, cid: str, doc: Document, compression: CompressionConfig, request: CreateContextRequest
    ) -> ContextInfo:
        engine = self._engine()
        ctx = await self.worker.run(engine.ingest, doc, compression)
        blob = await asyncio.to_thread(codec.encode, ctx, engine.identity)
        record = ContextRecord(
            id=cid,
            tenant=request.tenant,
            display_name=request.display_name,
            model=engine.identity.name,
            state="READY",
            create_time=now_iso(),
            context_tokens=ctx.context_len,
            prefix_tokens=ctx.prefix_len,
            method=ctx.method,
            ratio=ctx.ratio,
            chunk_size=ctx.chunk_size,
            kept_kv_pairs=ctx.kept_pairs,
            total_kv_pairs=ctx.total_pairs,
            bytes=len(blob),
        )
        await self.store.put(blob_key(cid), blob)
        await self.store.put(record_key(cid), record.to_json())  # the commit point
        self.resident.put(cid, ctx)
        log.info(
            "context %s ready: %d tokens, kept %.3f, %d bytes",
            cid,
            ctx.context_len,
            ctx.kept_pairs / max(ctx.total_pairs, 1),
            len(blob),
        )
        return record.info()

    async def _record(self, cid: str, tenant: str) -> ContextRecord | None:
        data = await self.store.get(record_key(cid))
        if data is None:
            return None
        record = ContextRecord.from_json(data)
        return record if record.tenant == tenant else None

    async def _require(self, cid: str, tenant: str) -> ContextRecord:
        record = await self._record(cid, tenant)
        if record is None:
            raise ContextNotFoundError(cid)
        return record

    async def get_context(self, context_id: str, tenant: str = "") -> ContextInfo:
        return (await self._require(context_id, tenant)).info()

    async def delete_context(self, context_id: str, tenant: str = "") -> None:
        await self._require(context_id, tenant)
        await self.store.delete(record_key(context_id))  # invisible first, then the bytes
        await self.store.delete(blob_key(context_id))
        self.resident.drop(context_id)

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
    ) -> AsyncIterator[tuple[list[int], float, int]]:
        """Yield (token ids so far, load seconds, prompt tokens) per generated token."""
        await self._require(context_id, request.tenant)
        if not request.question.strip():
            raise InvalidInputError("question must contain at least one non-whitespace character")
        engine = self._engine()
        t0 = time.perf_counter()
        ctx = await self._load(context_id)
        load_s = time.perf_counter() - t0
        prompt = await asyncio.to_thread(engine.encode_question, request.question)
        self._check_query(ctx, prompt, request.sampling.max_new_tokens)
        tokens: list[int] = []
        async for token in self.worker.stream(
            lambda: engine.generate(ctx, prompt, request.sampling)
        ):
            tokens.append(token)
            yield tokens, load_s, len(prompt)

    async def query(self, context_id: str, request: QueryRequest) -> QueryResult:
        record = await self._require(context_id, request.tenant)
        start = time.perf_counter()
        ttft = load_s = 0.0
        tokens: list[int] = []
        prompt_len = 0
        async for tokens, load_s, prompt_len in self.stream_tokens(context_id, request):  # noqa: B007
            if not ttft:
                ttft = time.perf_counter() - start
        total = time.perf_counter() - start
        engine = self._engine()
        answer = await asyncio.to_thread(engine.decode, tokens)
        if not tokens:  # nothing streamed: count the question tokens directly
            prompt_len = len(await asyncio.to_thread(engine.encode_question, request.question))
        finish = "length" if len(tokens) >= request.sampling.max_new_tokens else "stop"
        return QueryResult(
            answer=answer,
            prompt_tokens=record.prefix_tokens + record.context_tokens + prompt_len,
            completion_tokens=len(tokens),
            cached_tokens=record.prefix_tokens + record.context_tokens,
            timings=QueryTimings(load_s, ttft or total, max(total - (ttft or total), 0.0)),
            finish_reason=finish,
        )


def _validated(compression: CompressionConfig) -> CompressionConfig:
    if compression.method not in METHODS:
        raise InvalidInputError(f"unknown compression method {compression.method!r}; use {METHODS}")
    if not 0.0 < compression.ratio <= 1.0:
        raise InvalidInputError(f"ratio must be in (0, 1]. Given: {compression.ratio}")
    if compression.chunk_size < 16:
        raise InvalidInputError(f"chunk_size must be >= 16. Given: {compression.chunk_size}")
    return compression.normalized()


def build_embedded_service(config: ServiceConfig) -> EmbeddedContextService:
    """The factory app/ imports lazily inside its lifespan."""
    return EmbeddedContextService(config)
