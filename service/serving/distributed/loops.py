"""Small asyncio pieces of the worker loop that never hang on Python 3.11.

redis-py writes each command under `asyncio.wait_for`, which on Python 3.11 can drop a
cancellation (CPython gh-86296); these helpers neither depend on one being delivered nor
cut a Redis command in half.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError

from service import telemetry
from service.serving.distributed.heartbeat import Heartbeats, WorkerBeat

log = logging.getLogger(__name__)

_FATAL_MARKERS = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "NCCL error")


class Fraction:
    """A fraction written by the engine thread and read on the loop (ingest progress)."""

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, fraction: float) -> None:
        self.value = fraction


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` or until `stop` is set; True when it is set (not `wait_for`, which on
    Python 3.11 drops a cancellation that lands as `stop` is set: CPython gh-86296)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


def raise_if_cancelled() -> None:
    """Raise the cancellation of this task that redis-py lost; a loop that only waits on
    Redis would otherwise never end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@contextlib.asynccontextmanager
async def beside(
    loop: Callable[..., Coroutine[Any, Any, None]], *args: object
) -> AsyncIterator[None]:
    """Run `loop(done, *args)` beside the body; on exit set `done` and let it finish its
    current step. Never cancelled mid-command: a Redis call cut off by a cancellation can
    leave its connection out of step."""
    done = asyncio.Event()
    task = asyncio.create_task(loop(done, *args))
    try:
        yield
    finally:
        done.set()
        await asyncio.gather(task, return_exceptions=True)


class EngineHungError(RuntimeError):
    """The engine thread has been inside one call without progress too long."""


def is_device_failure(exc: BaseException) -> bool:
    """A CUDA error or a hung engine: the process must stop so that its orchestrator
    restarts it."""
    text = str(exc)
    hung = isinstance(exc, EngineHungError)
    return hung or (isinstance(exc, RuntimeError) and any(m in text for m in _FATAL_MARKERS))


async def watch_engine(
    done: asyncio.Event, stalled_s: Callable[[], float], limit_s: float,
    on_hung: Callable[[BaseException], object],
) -> None:  # fmt: skip
    """Until `done`: once the engine has gone `limit_s` without progress in one call, tell
    `on_hung` (once) and return."""
    while not await sleep_or_stop(done, min(5.0, limit_s / 4)):
        if (stalled := stalled_s()) > limit_s:
            on_hung(EngineHungError(f"the engine thread made no progress for {stalled:.0f} s"))
            return


async def beat_forever(
    done: asyncio.Event, heartbeats: Heartbeats, beat: Callable[[], WorkerBeat], every_s: float
) -> None:
    """Write `beat()` every `every_s` until `done` (a failed write is logged, not fatal);
    the time of the last one written is `kvzip_worker_heartbeat_timestamp_seconds`."""
    while not done.is_set():
        try:
            await heartbeats.beat(beat())
            telemetry.WORKER_HEARTBEAT.set_to_current_time()
        except (RedisError, OSError) as exc:
            log.warning("heartbeat failed: %s", exc)
        await sleep_or_stop(done, every_s)


async def every(
    done: asyncio.Event, seconds: float, step: Callable[[], Awaitable[object]], what: str
) -> None:
    """Run `step()` every `seconds` until `done`; a failure is logged and the loop goes on."""
    while not done.is_set():
        try:
            await step()
        except (RedisError, OSError) as exc:
            log.warning("%s failed: %s", what, exc)
        except Exception:
            log.exception("%s failed", what)
        await sleep_or_stop(done, seconds)
