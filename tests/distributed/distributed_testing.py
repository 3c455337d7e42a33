"""Helpers of the distributed tests: a fake executor, and an in-process cluster (an API-side
RemoteContextService plus StreamWorkers as tasks), all on a per-test Redis prefix."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from service.config import DistributedConfig, ServiceConfig
from service.errors import DocumentTooLongError
from service.serving.distributed.jobs import IngestJob, QueryJob
from service.serving.distributed.keys import RedisKeys
from service.serving.distributed.remote import RemoteContextService
from service.serving.distributed.stream_worker import Executor, Progress, StreamWorker
from service.serving.records import ContextRecord
from service.types import QueryEvent, QueryResult, QueryTimings
from storage import redis_client
from tests.storage.storage_testing import RedisEnv

REDIS_URL = "redis://127.0.0.1:6379/0"
CLOSE_S = 5.0  # the most any one teardown step may take (a stuck one fails the test instead)
IDENTITY = {
    "model": "fake-model",
    "model_fingerprint": "m" * 64,
    "tokenizer_fingerprint": "t" * 64,
    "format_version": "1",
}


@dataclass
class FakeExecutor:
    """Ingests in no time (unless `gate` holds it); answers "the pass key is 48213".
    `stored` stands for the shared disk: the records its objects describe."""

    identity: dict[str, str] = field(default_factory=lambda: dict(IDENTITY))
    device: str = "cpu"
    gate: asyncio.Event | None = None
    crash_with: Exception | None = None
    ingested: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)  # request ids answered to the end
    forgotten: list[str] = field(default_factory=list)
    stored: dict[str, ContextRecord] = field(default_factory=dict)
    stopped_early: list[str] = field(default_factory=list)
    resident: list[str] = field(default_factory=list)  # "on the device", most recent first
    words: tuple[str, ...] = ("the", " pass", " key", " is", " 48213")
    word_delay_s: float = 0.0
    texts: list[str] = field(default_factory=list)  # the documents ingested
    expiries: list[str | None] = field(default_factory=list)  # expire_time of each call
    stalled: float = 0.0  # what stalled_s() says: seconds the "engine" made no progress

    async def ingest(
        self, job: IngestJob, progress: Progress, registered: ContextRecord | None = None
    ) -> tuple[ContextRecord, tuple[str, ...]]:
        self.ingested.append(job.context_id)
        self._touch(job.context_id)
        self.texts.append(job.text)
        self.expiries.append(None if registered is None else registered.expire_time)
        progress(0.5)
        if self.gate is not None:
            await self.gate.wait()
        if self.crash_with is not None:
            raise self.crash_with
        tokens = len(job.text.split())
        if tokens > 1000:
            raise DocumentTooLongError(tokens, 1000)
        record = ContextRecord(
            id=job.context_id,
            tenant=job.tenant,
            display_name=job.display_name,
            model=self.identity["model"],
            state="READY",
            create_time=datetime.now(UTC).isoformat(),
            context_tokens=tokens,
            prefix_tokens=3,
            method=job.compression.method,
            ratio=job.compression.ratio,
            chunk_size=job.compression.chunk_size,
            kept_kv_pairs=tokens,
            total_kv_pairs=tokens * 3,
            bytes=tokens * 100,
            system=job.system,
        )
        if registered is not None:
            record = replace(
                record, create_time=registered.create_time, expire_time=registered.expire_time
            )
        self.stored[job.context_id] = record
        return record, ("disk", "redis")

    async def answer(
        self, job: QueryJob, expire_time: str | None = None
    ) -> AsyncIterator[QueryEvent]:
        self.answered.append(job.context_id)
        self._touch(job.context_id)
        self.expiries.append(expire_time)
        finished = False
        try:
            for word in self.words:
                await asyncio.sleep(self.word_delay_s)
                yield QueryEvent(delta=word)
            finished = True
            result = QueryResult(
                answer="".join(self.words),
                prompt_tokens=10,
                completion_tokens=len(self.words),
                cached_tokens=8,
                timings=QueryTimings(0.0, 0.01, 0.02),
            )
            self.completed.append(job.request_id)
            yield QueryEvent(result=result)
        finally:
            if not finished:
                self.stopped_early.append(job.request_id)

    async def purge(self, context_id: str) -> None:
        self.purged.append(context_id)
        self.stored.pop(context_id, None)

    async def forget(self, context_id: str) -> None:
        self.forgotten.append(context_id)

    async def restore(self, context_id: str) -> tuple[ContextRecord, tuple[str, ...]] | None:
        record = self.stored.get(context_id)
        return None if record is None else (record, ("disk",))

    async def stored_ids(self) -> list[str]:
        return sorted(self.stored)

    def stalled_s(self) -> float:
        return self.stalled

    def resident_ids(self, limit: int) -> list[str]:
        return self.resident[:limit]

    def _touch(self, context_id: str) -> None:
        if context_id in self.resident:
            self.resident.remove(context_id)
        self.resident.insert(0, context_id)


def distributed_config(prefix: str, **overrides: object) -> ServiceConfig:
    fields: dict[str, object] = dict(
        redis_url=REDIS_URL,
        redis_prefix=prefix,
        heartbeat_ttl_s=1.0,
        claim_idle_s=0.6,
        max_deliveries=3,
        wait_timeout_s=20.0,
    )
    fields.update(overrides)
    return ServiceConfig(distributed=DistributedConfig(**fields))  # type: ignore[arg-type]


@dataclass
class Running:
    worker: StreamWorker
    stop: asyncio.Event
    task: asyncio.Task[None]


class Cluster:
    """An API-side service and any number of in-process workers on one test prefix."""

    def __init__(self, env: RedisEnv, **overrides: object) -> None:
        self.env = env
        self.config = distributed_config(env.prefix, **overrides)
        self.keys = RedisKeys(env.prefix)
        self.api = RemoteContextService(self.config)
        self.running: dict[str, Running] = {}
        self._clients = [redis_client(REDIS_URL, timeout_s=5.0, retries=0)]

    async def __aenter__(self) -> Cluster:
        await self.api.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Tear everything down, each step within its own deadline, every step even when an
        earlier one failed (the first failure is raised at the end): never a hang."""
        steps = [functools.partial(self.stop_worker, name) for name in list(self.running)]
        steps.append(functools.partial(bounded, self.api.close, "closing the API"))
        steps += [functools.partial(bounded, c.aclose, "closing a client") for c in self._clients]
        await run_all(steps)

    def worker(self, name: str, executor: Executor, **kwargs: object) -> StreamWorker:
        client = redis_client(REDIS_URL, timeout_s=5.0, retries=0)
        self._clients.append(client)
        kwargs.setdefault("block_ms", 100)
        kwargs.setdefault("progress_interval_s", 0.05)
        return StreamWorker(
            client,
            self.keys,
            self.config.distributed,
            executor,
            name,
            **kwargs,  # type: ignore[arg-type]
        )

    async def start_worker(self, name: str, executor: Executor, **kwargs: object) -> StreamWorker:
        worker = self.worker(name, executor, **kwargs)
        stop = asyncio.Event()
        self.running[name] = Running(worker, stop, asyncio.create_task(worker.run(stop)))
        await self.until(lambda: self._beats(name))
        await self.api.refresh()
        return worker

    async def _beats(self, name: str) -> bool:
        return bool(await self.env.client.exists(self.keys.heartbeat(name)))

    async def stop_worker(self, name: str, grace_s: float = 5.0) -> None:
        """Stop a worker gracefully (it finishes its job), or cancel it after `grace_s`."""
        running = self.running.pop(name)
        running.stop.set()
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.shield(running.task)
        except TimeoutError:
            await cancelled(running.task, f"worker {name}")

    async def kill_worker(self, name: str) -> None:
        """Stop a worker the hard way: its task is cancelled mid-job, nothing acknowledged."""
        await cancelled(self.running.pop(name).task, f"worker {name}")

    async def events(self) -> list[tuple[str, str]]:
        """(event, context id) of every state transition so far."""
        entries = await self.env.client.xrange(self.keys.events)
        return [(f[b"event"].decode(), f[b"id"].decode()) for _, f in entries]

    @staticmethod
    async def until(condition: object, timeout_s: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await condition():  # type: ignore[operator]
            if loop.time() > deadline:
                raise AssertionError(f"condition not met within {timeout_s} s")
            await asyncio.sleep(0.02)


async def bounded(
    step: Callable[[], Awaitable[object]], what: str, seconds: float = CLOSE_S
) -> None:
    """Await `step()`, failing (never hanging) after `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            await step()
    except TimeoutError:
        raise AssertionError(f"{what} took over {seconds:g} s") from None


async def cancelled(task: asyncio.Task[None], what: str) -> None:
    """Cancel `task` and wait (at most CLOSE_S) for it to end."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await bounded(lambda: asyncio.shield(task), f"{what}, once cancelled,")


async def run_all(steps: list[Callable[[], Awaitable[object]]]) -> None:
    """Run every teardown step in order; then raise the first failure, if any."""
    failures: list[BaseException] = []
    for step in steps:
        try:
            await step()
        except Exception as exc:
            failures.append(exc)
    if failures:
        raise failures[0]
