"""EngineWorker: one dedicated thread runs every engine call, behind a bounded queue.

The event loop never runs model work. `run` awaits a single call on that thread: an
ingest, a decode, or one iteration of the continuous-batching scheduler
(service.serving.scheduler), so other work runs between decode steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from service import telemetry
from service.errors import QueueFullError

T = TypeVar("T")
_DONE = object()


class EngineWorker:
    """Serialises engine work on one thread; at most `queue_size` jobs admitted at once."""

    def __init__(self, queue_size: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvzip-engine")
        self._limit = queue_size
        self._admitted = 0
        self._active_since: float | None = None  # monotonic: the running call's last sign
        telemetry.track_worker(self)

    @property
    def queued(self) -> int:
        """Jobs admitted and not finished (running + waiting)."""
        return self._admitted

    def _admit(self) -> None:
        if self._admitted >= self._limit:
            raise QueueFullError(retry_after=1.0)
        self._admitted += 1

    async def run(self, fn: Callable[..., T], *args: object, admit: bool = True) -> T:
        """Run fn(*args) on the engine thread and await its result. admit=False: the
        scheduler's own iterations, which never count against the queue."""
        if admit:
            self._admit()
        submitted = time.perf_counter()

        def timed() -> T:
            if admit:
                telemetry.QUEUE_TIME.observe(time.perf_counter() - submitted)
            self._active_since = time.monotonic()
            try:
                return fn(*args)
            finally:
                self._active_since = None

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        finally:
            if admit:
                self._admitted -= 1

    def touch(self) -> None:
        """The running call made progress (an ingest's progress callback, on the thread)."""
        if self._active_since is not None:
            self._active_since = time.monotonic()

    def stalled_s(self) -> float:
        """Seconds the running call has gone without a sign of progress (0 when idle): a
        hung engine (a stuck kernel, a deadlock) grows this without bound."""
        since = self._active_since
        return 0.0 if since is None else time.monotonic() - since

    def close(self, wait: bool = True) -> None:
        """Stop the thread; wait=False leaves a hung call behind (the process is ending)."""
        self._executor.shutdown(wait=wait, cancel_futures=True)

