"""RemoteContextService: the ContextService of an API process in distributed mode.

It never loads a model (nor torch): every registration becomes an ingest job and every
question a query job on the Redis streams; records live in Redis (redis_records; a lookup
that finds none asks the workers to rebuild it from its stored object: housekeeping),
answers come back token by token over a per-request stream. Readiness = Redis answers and
at least one worker heartbeat is live (checked in the background, so that `is_ready` stays
a cheap, synchronous call). Redis down = EngineUnavailableError (503) with the reason,
within the client's short socket timeouts, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from functools import partial

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service import telemetry
from service.config import CompressionConfig, ServiceConfig
from service.errors import (
    ContextLostError,
    ContextNotFoundError,
    ContextNotReadyError,
    EngineUnavailableError,
    QueueFullError,
)
from service.serving.distributed.affinity import submit_query
from service.serving.distributed.heartbeat import Heartbeats, WorkerBeat
from service.serving.distributed.housekeeping import request_restore
from service.serving.distributed.jobs import (
    DELTA,
    ERROR,
    INGEST,
    QUERY,
    RESULT,
    START,
    IngestJob,
    QueryJob,
    Reply,
    error_from_payload,
)
from service.serving.distributed.keys import RedisKeys
from service.serving.distributed.redis_records import FAILED, PROCESSING, RecordStore
from service.serving.distributed.remote_record import RemoteRecord
from service.serving.distributed.transport import JobQueue, ReplyReader
from service.serving.ids import context_id
from service.serving.quota import check_quota
from service.serving.registry import extended_expiry, processing_record, time_left
from service.serving.validation import checked_expiry, validated_create, validated_query
from service.types import (
    ContextInfo,
    ContextPage,
    CreateContextRequest,
    QueryEvent,
    QueryRequest,
    QueryResult,
)
from storage import redacted_url, redis_client

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 2.0  # per socket operation (a Redis that is down costs at most this)
REPLY_BLOCK_MS = 250  # one blocking read of a reply stream, well inside the socket timeout
ORPHAN_GRACE_S = 10.0  # a PROCESSING record this old with no job was never submitted


class RemoteContextService:
    """ContextService over Redis (see service.facade and the package docstring)."""

    def __init__(self, config: ServiceConfig, client: Redis | None = None) -> None:
        distributed = config.distributed
        if client is None and not distributed.redis_url:
            raise ValueError("distributed mode needs a Redis URL (KVZIP_REDIS_URL)")
        self.config = config
        self.model_name = config.engine.model
        self.redis_url = redacted_url(distributed.redis_url or "redis://(given client)")
        self.client = client or redis_client(
            distributed.redis_url or "", timeout_s=REDIS_TIMEOUT_S, retries=0
        )
        self._owns_client = client is None
        self.keys = RedisKeys(distributed.redis_prefix)
        self.records = RecordStore(self.client, self.keys)
        self.queue = JobQueue(self.client, self.keys)
        self.heartbeats = Heartbeats(self.client, self.keys, distributed.heartbeat_ttl_s)
        self.workers: list[WorkerBeat] = []
        telemetry.track_cluster(self)  # kvzip_workers_live
        self.redis_error: str | None = "not checked yet"
        self.last_worker_seen = -math.inf  # time.monotonic() of the last live heartbeat seen
        self._last_identity: dict[str, str] | None = None
        self.poll_s = min(1.0, distributed.heartbeat_ttl_s / 3)
        self._monitor: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()  # the monitor's way out, even if a cancel is lost

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Look at Redis and the workers once, then keep looking in the background. Never
        fails for a Redis that is down: requests answer 503 until it is back."""
        await self.refresh()
        if self.redis_error is not None:
            log.warning("Redis at %s is unreachable: %s", self.redis_url, self.redis_error)
        self._monitor = asyncio.create_task(self._monitor_forever())

    async def close(self) -> None:
        if self._monitor is not None:
            self._closing.set()  # redis-py can swallow the cancel below (see _monitor_forever)
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self._owns_client:
            await self.client.aclose()

    def is_ready(self) -> bool:
        """Redis answered at the last look and at least one worker heartbeat is live."""
        return self.redis_error is None and bool(self.workers)

    async def refresh(self) -> None:
        """Update `workers` and `redis_error` (and the model name the workers serve)."""
        try:
            workers = await self.heartbeats.live()
        except (RedisError, OSError) as exc:
            self.redis_error, self.workers = str(exc) or repr(exc), []
            return
        self.redis_error, self.workers = None, workers
        if workers:
            self.last_worker_seen = time.monotonic()
            self._last_identity = self._identity()
            self.model_name = self._last_identity["model"]

    def _workers_gone(self) -> bool:
        """No heartbeat seen for two heartbeat lifetimes (a short lapse under load is fine)."""
        grace = 2 * self.config.distributed.heartbeat_ttl_s
        return self.redis_error is None and time.monotonic() - self.last_worker_seen > grace

    async def _monitor_forever(self) -> None:
        """Refresh every `poll_s` until `close`. Not `while True`: on Python 3.11 redis-py's
        write of a command (under `asyncio.wait_for`) can swallow the cancel `close` sends."""
        while not self._closing.is_set():
            await asyncio.sleep(self.poll_s)
            await self.refresh()

    @contextlib.contextmanager
    def _redis(self) -> Iterator[None]:
        """Turn a Redis failure into a 503 that says what is wrong."""
        try:
            yield
        except (RedisError, OSError) as exc:
            self.redis_error = str(exc) or repr(exc)
            raise self._unreachable() from exc

    def _unreachable(self) -> EngineUnavailableError:
        return EngineUnavailableError(
            f"Redis at {self.redis_url} is unreachable ({self.redis_error}); the service "
            "cannot take requests until it is back"
        )

    async def _require_worker(self) -> dict[str, str]:
        """The model identity of the live workers; 503 when Redis or every worker is gone."""
        if self.redis_error is not None or not self.workers:
            await self.refresh()
        if self.redis_error is not None:
            raise self._unreachable()
        if self.workers:
            return self._identity()
        if self._last_identity is None or self._workers_gone():
            raise EngineUnavailableError(
                "no live worker: start one with `kvzip worker` (KVZIP_MODE=distributed, the "
                f"same KVZIP_REDIS_URL and KVZIP_REDIS_PREFIX={self.keys.prefix!r})"
            )
        return self._last_identity  # a heartbeat late by less than the grace: still fine

    def _identity(self) -> dict[str, str]:
        """The model identity most live workers serve (they should all agree)."""
        counts = Counter(tuple(sorted(w.identity.items())) for w in self.workers)
        if len(counts) > 1:
            log.warning("live workers serve %d models; using the most common", len(counts))
        return dict(counts.most_common(1)[0][0])

    async def _admit(self, kind: str) -> None:
        """QueueFullError when the stream of `kind` already holds its share of jobs."""
        limit = self.config.queue_size * max(1, len(self.workers))
        if await self.queue.backlog(kind) >= limit:
            raise QueueFullError(retry_after=1.0)

    # -- contexts ----------------------------------------------------------------------------

    async def create_context(self, request: CreateContextRequest) -> tuple[ContextInfo, bool]:
        checked = validated_create(request, self.config)
        with self._redis():
            identity = await self._require_worker()
            compression = checked.compression
            cid = context_id(identity, compression, request.tenant, request.system, request.text)
            existing = await self.records.get(cid)
            if existing is None or existing.state == FAILED:
                await self._admit(INGEST)
            new = RemoteRecord(processing_record(cid, checked, identity["model"]))
            record, created = await self.records.create(new, partial(check_quota, self.config))
            if created or (record.state == PROCESSING and await self._orphaned(record)):
                await self._submit_ingest(record, request, compression)  # (again: job lost)
            if not created:
                record = await self._extend(record, checked.ttl_s)
            if request.wait and record.state == PROCESSING:
                timeout = self.config.distributed.wait_timeout_s
                record = await self.records.wait_settled(cid, timeout)
        if request.wait and record.state == FAILED and record.failure is not None:
            raise error_from_payload(record.failure)
        return record.info(), created

    async def _submit_ingest(
        self, record: RemoteRecord, request: CreateContextRequest, compression: CompressionConfig
    ) -> None:
        job = IngestJob(
            context_id=record.id,
            tenant=request.tenant,
            text=request.text,
            compression=compression,
            display_name=request.display_name,
            system=request.system,
        )
        try:
            entry = await self.queue.submit(job, ttl_s=time_left(record.record.expire_time))
            key = self.keys.ingest_job(record.id)
            await self.client.set(key, entry, px=int(self.config.max_ttl_s * 1000))
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await self.records.delete(record)  # no job, no record
            raise

    async def _orphaned(self, record: RemoteRecord) -> bool:
        """A PROCESSING context whose ingest job is gone: the API stopped between the record
        and the job (then no entry id after ORPHAN_GRACE_S), or Redis lost the entry."""
        entry = await self.client.get(self.keys.ingest_job(record.id))
        if entry is None:
            created = datetime.fromisoformat(record.record.create_time)
            return (datetime.now(UTC) - created).total_seconds() > ORPHAN_GRACE_S
        return not await self.client.xrange(self.keys.stream(INGEST), entry, entry)

    async def _extend(self, record: RemoteRecord, ttl: float) -> RemoteRecord:
        """Registering a document again keeps it alive at least `ttl` more seconds."""
        expire = extended_expiry(record.record.expire_time, ttl)
        if expire is None:
            return record
        await self.records.set_expiry(
            record.id, datetime.fromisoformat(expire), record.record.tenant
        )
        return await self.records.get(record.id) or record

    async def _visible(self, context_id: str, tenant: str) -> RemoteRecord:
        with self._redis():
            record = await self.records.get(context_id)
            if record is None and await request_restore(self.client, self.keys, context_id):
                record = await self.records.get(context_id)  # rebuilt from its stored object
        if record is None or not record.record.visible_to(tenant):
            raise ContextNotFoundError(context_id)
        return record

    async def get_context(self, context_id: str, tenant: str = "") -> ContextInfo:
        return (await self._visible(context_id, tenant)).info()

    async def delete_context(self, context_id: str, tenant: str = "") -> None:
        record = await self._visible(context_id, tenant)
        with self._redis():
            await self.records.delete(record)

    async def update_context(
        self, context_id: str, expire_time: datetime, tenant: str = ""
    ) -> ContextInfo:
        expire = checked_expiry(expire_time, self.config.max_ttl_s)
        await self._visible(context_id, tenant)
        with self._redis():
            if not await self.records.set_expiry(context_id, expire, tenant):
                raise ContextNotFoundError(context_id)
        return (await self._visible(context_id, tenant)).info()

    async def list_contexts(
        self, tenant: str = "", page_size: int = 50, page_token: str | None = None
    ) -> ContextPage:
        with self._redis():
            return await self.records.page(tenant, page_size, page_token)

    # -- queries -----------------------------------------------------------------------------

    async def _submit_query(self, context_id: str, request: QueryRequest) -> QueryJob:
        request = validated_query(request, self.config)  # before any job exists
        record = await self._visible(context_id, request.tenant)
        if record.state == PROCESSING:
            raise ContextNotReadyError(
                f"context {context_id!r} is still processing ({record.record.progress:.0%} of "
                "its tokens scored); retry when its state is READY"
            )
        if record.state == FAILED:
            if (record.failure or {}).get("type") == ContextLostError.__name__:
                raise error_from_payload(record.failure or {})  # gone: register it again
            raise ContextNotReadyError(f"context {context_id!r} failed: {record.record.error}")
        with self._redis():
            await self._require_worker()
            await self._admit(QUERY)
            deadline = time.time() + self.config.distributed.wait_timeout_s
            job = QueryJob(uuid.uuid4().hex, context_id, request, deadline)
            await submit_query(self.queue, job, self.workers)  # to its holder, or any worker
        return job

    async def _replies(self, job: QueryJob) -> AsyncIterator[Reply]:
        """The job's replies as they arrive; EngineUnavailableError when none can come."""
        reader = ReplyReader(self.client, self.keys.reply(job.request_id))
        while True:
            remaining = job.deadline - time.time()
            if remaining <= 0:
                raise EngineUnavailableError(
                    f"no worker answered within {self.config.distributed.wait_timeout_s:g} s"
                )
            with self._redis():
                replies = await reader.read(max(1, min(REPLY_BLOCK_MS, int(remaining * 1000))))
            for reply in replies:
                yield reply
            if not replies and self._workers_gone():
                raise EngineUnavailableError("no live worker is left to answer this question")

    async def _forget(self, job: QueryJob, cancel: bool) -> None:
        """Drop the reply stream; tell the worker to stop when the asker went away."""
        with contextlib.suppress(RedisError, OSError):
            async with self.client.pipeline(transaction=False) as pipe:
                if cancel:
                    pipe.set(self.keys.cancel(job.request_id), b"1", px=60_000)
                pipe.unlink(self.keys.reply(job.request_id))
                await pipe.execute()

    async def query(self, context_id: str, request: QueryRequest) -> QueryResult:
        """The whole answer (a worker that restarts the job after a crash is fine here)."""
        job = await self._submit_query(context_id, request)
        done = False
        try:
            async for reply in self._replies(job):
                if reply.type == ERROR:
                    done = True
                    raise error_from_payload(reply.error or {})
                if reply.type == RESULT and reply.result is not None:
                    done = True
                    return reply.result
        finally:
            await self._forget(job, cancel=not done)
        raise AssertionError("unreachable: _replies ends only by raising")  # pragma: no cover

    async def stream_query(
        self, context_id: str, request: QueryRequest
    ) -> AsyncIterator[QueryEvent]:
        """Text deltas as the worker produces them, then the result. Closing early cancels
        the generation on the worker."""
        job = await self._submit_query(context_id, request)
        done = False
        attempt: str | None = None
        sent = False
        try:
            async for reply in self._replies(job):
                if reply.type == ERROR:
                    done = True
                    raise error_from_payload(reply.error or {})
                if reply.type == START:
                    if sent and reply.attempt != attempt:
                        raise EngineUnavailableError(
                            "the worker answering this question stopped mid-answer; ask again"
                        )
                    attempt = reply.attempt
                elif reply.attempt != attempt:
                    continue  # a stale event of an abandoned attempt
                elif reply.type == DELTA:
                    sent = True
                    yield QueryEvent(delta=reply.delta)
                elif reply.type == RESULT:
                    done = True
                    yield QueryEvent(result=reply.result)
                    return
        finally:
            await self._forget(job, cancel=not done)


def build_remote_service(config: ServiceConfig) -> RemoteContextService:
    """The factory app/ imports by name when KVZIP_MODE=distributed."""
    return RemoteContextService(config)


__all__ = ["RemoteContextService", "build_remote_service"]
