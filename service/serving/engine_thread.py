"""EngineWorker: one dedicated thread runs every engine call, behind a bounded queue.

The event loop never runs model work. `run` awaits a single call; `stream` iterates a
generator on the worker thread and hands its items to the loop one by one; closing the
async iterator early (client gone) stops the generator at its next item.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
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
            return fn(*args)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        finally:
            if admit:
                self._admitted -= 1

    async def stream(self, make: Callable[[], Iterator[T]]) -> AsyncGenerator[T, None]:
        """Iterate make() on the engine thread, yielding each item on the event loop."""
        self._admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()
        submitted = time.perf_counter()

        def timed() -> Iterator[T]:
            telemetry.QUEUE_TIME.observe(time.perf_counter() - submitted)
            return make()

        job = loop.run_in_executor(self._executor, _pump, timed, queue, loop, cancelled)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:  # no await here: a cancelled caller may be cancelled again at any await
            cancelled.set()
            job.add_done_callback(self._release)  # the slot frees when the thread lets go

    def _release(self, _job: object = None) -> None:
        self._admitted -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _pump(
    make: Callable[[], Iterator[object]],
    queue: asyncio.Queue[object],
    loop: asyncio.AbstractEventLoop,
    cancelled: threading.Event,
) -> None:
    """Worker-thread side of `stream`: push items (or the error) then the end marker."""
    try:
        for item in make():
            loop.call_soon_threadsafe(queue.put_nowait, item)
            if cancelled.is_set():
                break
    except Exception as exc:  # handed to the awaiting coroutine, re-raised there
        loop.call_soon_threadsafe(queue.put_nowait, exc)
    finally:
        loop.call_soon_threadsafe(queue.put_nowait, _DONE)
