"""What a worker needs from the engine side (service.serving.distributed.executor is the
real one; the tests use a fake)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from service.serving.distributed.jobs import IngestJob, QueryJob
from service.serving.records import ContextRecord
from service.types import QueryEvent

Progress = Callable[[float], None]


class Executor(Protocol):
    """Runs a worker's jobs on an engine."""

    identity: dict[str, str]
    device: str

    async def ingest(
        self, job: IngestJob, progress: Progress, registered: ContextRecord | None = None
    ) -> tuple[ContextRecord, tuple[str, ...]]:
        """Compute (or find stored) and durably store the context; its READY record and the
        tiers that hold it. Raises a ServiceError for a document that can never succeed.
        registered: the record the API made (times, expiry), for the object to describe;
        its stored bytes expire with it."""

    def resident_ids(self, limit: int) -> list[str]:
        """The contexts held decoded on the device, most recently used first (at most
        `limit`): the worker publishes them so that their queries are routed to it."""

    def answer(self, job: QueryJob, expire_time: str | None = None) -> AsyncIterator[QueryEvent]:
        """The answer as text deltas, then one event with the result. expire_time: the
        context's expiry now (it may have been extended): its stored bytes are kept as
        long."""

    async def purge(self, context_id: str) -> None:
        """Remove the context's bytes from every tier."""

    async def forget(self, context_id: str) -> None:
        """Drop this process's in-memory copies of a context purged elsewhere."""

    async def restore(self, context_id: str) -> tuple[ContextRecord, tuple[str, ...]] | None:
        """The READY record the context's stored object describes (expiry included) and the
        shared tiers that hold it; None when there is no such object."""

    async def stored_ids(self) -> list[str]:
        """The ids of every context stored on the shared disk."""

    def stalled_s(self) -> float:
        """Seconds the engine has been inside one call without progress (0 when idle)."""
