"""The engine thread's progress clock (service.serving.engine_thread): how a hung engine is
told from a long one."""

from __future__ import annotations

import asyncio
import threading
import time

from service.serving.engine_thread import EngineWorker


async def test_stalled_grows_while_a_call_makes_no_progress_and_touch_resets_it():
    worker = EngineWorker(4)
    release, ticked = threading.Event(), threading.Event()

    def long_call() -> str:
        time.sleep(0.3)
        worker.touch()  # a progress report, from the engine thread
        ticked.set()
        release.wait(10)
        return "done"

    try:
        assert worker.stalled_s() == 0.0  # idle
        call = asyncio.create_task(worker.run(long_call))
        await asyncio.sleep(0.25)
        assert 0.2 < worker.stalled_s() < 5
        await asyncio.to_thread(ticked.wait, 10)
        assert worker.stalled_s() < 0.2  # progress restarted the clock
        release.set()
        assert await asyncio.wait_for(call, 10) == "done"
        assert worker.stalled_s() == 0.0
    finally:
        release.set()
        worker.close()
