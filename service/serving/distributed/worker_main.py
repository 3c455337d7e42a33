"""`run_worker(config)`: the worker process of distributed mode (`kvzip worker`).

Loads the model once, joins the consumer group on the Redis at `config.distributed.
redis_url`, and serves ingest and query jobs until SIGTERM or SIGINT (the job in progress
is finished first; one that outlives the process is taken over by another worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal

from service.config import ServiceConfig
from service.engine.kvzip_engine import KVzipEngine
from service.serving.distributed.executor import EngineExecutor, build_shared_store
from service.serving.distributed.heartbeat import default_worker_name
from service.serving.distributed.keys import RedisKeys
from service.serving.distributed.loops import EngineHungError
from service.serving.distributed.stream_worker import StreamWorker
from storage import redis_client

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 10.0  # > the blocking read (0.5 s) and enough for a 32 MiB part


EXIT_DEVICE_FAILED = 3


def run_worker(config: ServiceConfig) -> None:
    """Serve jobs until SIGTERM/SIGINT (blocking; the process's one event loop). A device
    failure (CUDA error) or a hung engine ends the process with status 3, for its
    orchestrator to restart (a hung engine thread cannot be joined: the process ends
    without waiting for it)."""
    fatal = asyncio.run(serve(config))
    if isinstance(fatal, EngineHungError):
        logging.shutdown()
        os._exit(EXIT_DEVICE_FAILED)
    if fatal is not None:
        raise SystemExit(EXIT_DEVICE_FAILED)


async def serve(config: ServiceConfig, stop: asyncio.Event | None = None) -> BaseException | None:
    """The worker on this event loop, until `stop` is set (or a signal arrives); returns the
    device failure that stopped it, if one did."""
    distributed = config.distributed
    if not distributed.redis_url:
        raise ValueError("a worker needs a Redis URL (KVZIP_REDIS_URL)")
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    name = distributed.worker_name or default_worker_name(config.engine.device)
    log.info("worker %s: loading %s", name, config.engine.model)
    engine = await asyncio.to_thread(KVzipEngine.load, config.engine)
    client = redis_client(distributed.redis_url, timeout_s=REDIS_TIMEOUT_S, retries=1)
    cache = client
    if distributed.redis_cache_url:  # the Redis tier on its own (allkeys-lru) server
        cache = redis_client(distributed.redis_cache_url, timeout_s=REDIS_TIMEOUT_S, retries=1)
    executor = EngineExecutor(config, engine, build_shared_store(config, cache))
    await executor.start()
    worker = StreamWorker(
        client,
        RedisKeys(distributed.redis_prefix),
        distributed,
        executor,
        name,
        sweep_interval_s=config.sweep_interval_s,
        max_queries=config.batching.max_rows,  # the scheduler decodes them together
    )
    executor.registry.on_lost.append(worker.queries.mark_lost)  # evicted or damaged: FAILED
    try:
        await worker.run(stop)
        return worker.fatal
    finally:
        await executor.close()
        await client.aclose()
        if cache is not client:
            await cache.aclose()


def _stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT stop the worker; SIGUSR1 logs what each of its tasks is waiting on."""
    loop = asyncio.get_running_loop()
    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGUSR1: _log_tasks}
    for sig, handler in handlers.items():
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, handler)


def _log_tasks() -> None:
    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue())
