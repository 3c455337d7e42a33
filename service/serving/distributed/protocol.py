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
        self, job: IngestJob, progress: Progress, expire_time: str | None = None
    ) -> tuple[ContextRecord, tuple[str, ...]]:
        """Compute (or find stored) and durably store the context; its READY record and the
        tiers that hold it. Raises a ServiceError for a document that can never succeed.
        expire_time: the context's expiry (ISO 8601), which its stored bytes carry too."""

    def resident_ids(self, limit: int) -> list[str]:
        """The contexts held decoded on the device, most recently used first (at most
        `limit`): the worker publishes them so that their queries are routed to it."""

    def answer(self, job: QueryJob, expire_time: str | None = None) -> AsyncIterator[QueryEvent]:
        """The answer as text deltas, then one event with the result. expire_time: the
        context's expiry now (it may have been extended): its stored bytes are kept as
        long."""

    async def purge(self, context_id: str) -> None:
        """Remove the context's bytes from every tier."""
