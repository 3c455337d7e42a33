"""Memory held by requests (issue 13 item 9): a request holds its decoded context only once
admitted (ContextHolds, within the KV budget), so requests queued on distinct contexts do
not each decode one; on a CPU engine the stored bytes are not cached a second time."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from pathlib import Path

import pytest

from service.config import BatchingConfig, CompressionConfig, EngineConfig, ServiceConfig
from service.errors import QueueFullError
from service.serving.embedded import EmbeddedContextService, build_embedded_service
from service.serving.holds import ContextHolds, decoded_bytes
from service.types import CreateContextRequest, QueryRequest, SamplingParams

TEXT = "The museum opens at nine. Tickets cost twelve euros. The cafe closes at five. " * 8


async def _started(tiny_engine, data_dir: Path, **overrides) -> EmbeddedContextService:
    config = ServiceConfig(engine=EngineConfig(model="tiny"), data_dir=data_dir, **overrides)
    svc = build_embedded_service(config, engine=tiny_engine)
    await svc.start()
    return svc


class LiveContexts:
    """Counts the decoded contexts alive (weak references), and the most at once."""

    def __init__(self) -> None:
        self.alive = self.most = 0
        self._lock = threading.RLock()  # the finalizer may run inside `track`'s collect

    def track(self, ctx: object) -> None:
        gc.collect()  # contexts nobody holds any more are gone before counting
        with self._lock:
            self.alive += 1
            self.most = max(self.most, self.alive)
        weakref.finalize(ctx, self._gone)

    def _gone(self) -> None:
        with self._lock:
            self.alive -= 1


async def test_queued_requests_on_distinct_contexts_decode_within_the_budget(
    tiny_engine, tmp_path
):
    first = await _started(tiny_engine, tmp_path)
    ids = []
    for i in range(4):
        request = CreateContextRequest(f"{TEXT} Room {i}.", compression=CompressionConfig())
        ids.append((await first.create_context(request))[0].id)
    record = await first.registry.record(ids[0], "")
    await first.close()
    assert record is not None
    size = decoded_bytes(record, 4)  # fp32
    budget = BatchingConfig(max_rows=4, kv_budget_bytes=int(size * 1.5), queue_size=8)
    svc = await _started(tiny_engine, tmp_path, memory_cache_bytes=0, batching=budget)
    try:
        live, decode = LiveContexts(), svc.pipeline._decode

        def tracked(*args):  # (blob, the shared prefix of a quantized object)
            ctx = decode(*args)
            live.track(ctx)
            return ctx

        svc.pipeline._decode = tracked  # type: ignore[method-assign]
        question = QueryRequest("When?", SamplingParams(max_new_tokens=8))
        answers = await asyncio.gather(*(svc.query(cid, question) for cid in ids))
        assert all(a.completion_tokens > 0 for a in answers)
        assert live.most == 1  # one context decoded at a time, not one per queued request
        assert svc.pipeline.holds.peak_bytes <= budget.kv_budget_bytes
    finally:
        await svc.close()


async def test_the_size_a_hold_counts_is_the_decoded_size(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path)
    try:
        for scheme in ("none", "int4"):
            compression = CompressionConfig("kvzip", 0.3, 64, quantization=scheme)
            info, _ = await svc.create_context(CreateContextRequest(TEXT, compression=compression))
            record = await svc.registry.record(info.id, "")
            svc.resident.drop(info.id)
            ctx = await svc.pipeline.load(info.id)
            assert record is not None and decoded_bytes(record, 4) == ctx.nbytes
    finally:
        await svc.close()


async def test_a_cpu_engine_keeps_no_second_copy_of_the_bytes(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path, memory_cache_bytes=1 << 30)
    try:
        info, _ = await svc.create_context(CreateContextRequest(TEXT))
        await svc.query(info.id, QueryRequest("When?", SamplingParams(max_new_tokens=4)))
        assert svc.resident.bytes_used > 0
        assert svc.store.tier("memory").bytes_used == 0  # the decoded copy is the only one
    finally:
        await svc.close()


# --- ContextHolds alone -------------------------------------------------------------------


async def test_holds_admit_first_come_first_served_within_the_budget():
    holds = ContextHolds(budget_bytes=100, queue_size=2)
    order: list[str] = []
    release = {name: asyncio.Event() for name in "abcd"}

    async def ask(name: str, cid: str, nbytes: int) -> None:
        async with holds.hold(cid, nbytes):
            order.append(name)
            await release[name].wait()

    a = asyncio.create_task(ask("a", "x", 80))
    await asyncio.sleep(0)
    b = asyncio.create_task(ask("b", "y", 80))  # does not fit beside x
    c = asyncio.create_task(ask("c", "x", 80))  # shares x: joins at once
    await asyncio.sleep(0)
    assert order == ["a", "c"] and holds.waiting == 1 and holds.held_bytes == 80
    d = asyncio.create_task(ask("d", "z", 10))  # would fit, but b is first in line
    await asyncio.sleep(0)
    assert holds.waiting == 2
    with pytest.raises(QueueFullError):
        await holds.hold("w", 1).__aenter__()
    release["a"].set()
    release["c"].set()
    await asyncio.gather(a, c)
    await asyncio.sleep(0)
    assert order == ["a", "c", "b", "d"]  # x let go: y, then z beside it
    release["b"].set()
    release["d"].set()
    await asyncio.gather(b, d)
    assert holds.held_bytes == 0 and holds.peak_bytes == 90


async def test_a_waiter_that_goes_away_lets_the_next_one_in():
    holds = ContextHolds(budget_bytes=100, queue_size=4)
    async with holds.hold("x", 100):
        gone = asyncio.create_task(holds.hold("y", 50).__aenter__())
        await asyncio.sleep(0)
        assert holds.waiting == 1
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert holds.waiting == 0
    async with holds.hold("z", 500):  # alone, whatever its size
        assert holds.held_bytes == 500


async def test_the_prompt_layouts_are_an_lru_of_bounded_size(tiny_engine, tmp_path):
    from service.serving.pipeline import LAYOUTS

    svc = await _started(tiny_engine, tmp_path)
    try:
        pipeline = svc.pipeline
        expected = pipeline.question_ids("system 0", "Q?")
        for i in range(LAYOUTS + 20):  # tenants choose the system instruction
            pipeline.question_ids(f"system {i}", "Q?")
            pipeline.question_ids("system 0", "Q?")  # kept in use
        assert len(pipeline._layouts) == LAYOUTS
        assert "system 0" in pipeline._layouts and "system 1" not in pipeline._layouts
        assert pipeline.question_ids("system 0", "Q?") == expected
    finally:
        await svc.close()
