"""Registrations whose ingest has not finished, held in memory by the embedded service.

A context is here while PROCESSING (with the fraction of its tokens scored) and, when an
ingest nobody waited for failed, as FAILED until it expires or is deleted; once READY it
lives in the registry only. Deleting a context in flight aborts its ingest at the next
scoring chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace

from service import telemetry
from service.errors import ContextNotFoundError, QueueFullError, public_message
from service.serving.records import ContextRecord
from service.types import ANY_TENANT, ContextInfo

log = logging.getLogger(__name__)

PROCESSING, FAILED = "PROCESSING", "FAILED"


class AbortedError(Exception):
    """Raised from the progress callback to stop the ingest of a context deleted meanwhile."""


@dataclass
class Ingest:
    """One registration in flight (PROCESSING), or whose unwaited ingest failed (FAILED)."""

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

    def set_progress(self, fraction: float) -> None:
        """The engine's progress callback (engine thread, between scoring chunks)."""
        if self.aborted:
            raise AbortedError(self.record.id)
        self.progress = fraction

    def set_expiry(self, expire_time: str) -> None:
        self.record = replace(self.record, expire_time=expire_time)

    def not_ready_reason(self) -> str:
        cid = self.record.id
        if self.record.state == FAILED:
            return f"context {cid!r} failed: {self.record.error}"
        return (
            f"context {cid!r} is still processing ({self.progress:.0%} of its tokens scored); "
            "retry when its state is READY"
        )


class InFlight:
    """The in-flight registrations by context id."""

    def __init__(self) -> None:
        self._items: dict[str, Ingest] = {}

    def add(self, record: ContextRecord, waited: bool) -> Ingest:
        future: asyncio.Future[ContextInfo] = asyncio.get_running_loop().create_future()
        ingest = Ingest(record, future, waited)
        self._items[record.id] = ingest
        return ingest

    def get(self, cid: str, tenant: str) -> Ingest | None:
        """The registration `cid` if `tenant` may see it; an expired one is aborted."""
        ingest = self._items.get(cid)
        if ingest is None or not ingest.record.visible_to(tenant):
            return None
        if ingest.record.expired():
            self.abort(ingest)
            return None
        return ingest

    def visible(self, tenant: str) -> Iterator[Ingest]:
        for cid in list(self._items):
            if (ingest := self.get(cid, tenant)) is not None:
                yield ingest

    def drop_expired(self) -> None:
        for _ in self.visible(ANY_TENANT):  # get() drops the expired ones
            pass

    def abort(self, ingest: Ingest) -> None:
        """Stop the ingest at its next scoring chunk and forget it."""
        ingest.aborted = True
        self._forget(ingest)

    def abort_all(self) -> list[asyncio.Task[None]]:
        """Abort every ingest (shutdown); their tasks, to await."""
        tasks = [i.task for i in self._items.values() if i.task is not None]
        for ingest in self._items.values():
            ingest.aborted = True
        return tasks

    def settle(self, ingest: Ingest, outcome: ContextInfo | BaseException) -> None:
        """Resolve the ingest's future; a failure nobody waited for stays visible as FAILED."""
        if isinstance(outcome, ContextInfo):
            telemetry.INGESTS.labels("ready").inc()
            ingest.future.set_result(outcome)
        elif isinstance(outcome, asyncio.CancelledError):
            telemetry.INGESTS.labels("aborted").inc()
            ingest.future.cancel()
        else:
            aborted = isinstance(outcome, ContextNotFoundError | AbortedError) or ingest.aborted
            telemetry.INGESTS.labels("aborted" if aborted else "failed").inc()
            ingest.future.set_exception(outcome)
            ingest.future.exception()  # retrieved: waiters re-raise it, nobody else must
            if not (aborted or ingest.waited or isinstance(outcome, QueueFullError)):
                log.warning("context %s failed to ingest", ingest.record.id, exc_info=outcome)
                error = public_message(outcome, "ingesting")  # no internals for tenants
                ingest.record = replace(ingest.record, state=FAILED, error=error)
                return
        self._forget(ingest)

    def _forget(self, ingest: Ingest) -> None:
        if self._items.get(ingest.record.id) is ingest:
            del self._items[ingest.record.id]
