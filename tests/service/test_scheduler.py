"""Continuous batching (service.serving.scheduler) on the tiny model, against the engine's
single-request decode (service.engine.generation.generate) as the reference."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.config import BatchingConfig, CompressionConfig
from service.engine.kvcache import CompressedContext
from service.errors import QueueFullError
from service.serving.engine_thread import EngineWorker
from service.serving.scheduler import Scheduler
from service.types import SamplingParams

DOCS = [
    "The museum opens at nine. Tickets cost twelve euros. " * 6,
    "The pass key is 48213. Remember it, it matters. " * 10,
    "Rivers run to the sea; the sea is never full. " * 3,
]
QUESTIONS = ["When does it open?", "What is the pass key?", "Where do rivers run to, exactly?"]


@pytest.fixture(scope="module")
def contexts(tiny_engine) -> list[CompressedContext]:
    """Different documents (lengths) at different kept ratios."""
    settings = [CompressionConfig("kvzip", r, 64) for r in (0.3, 0.5, 1.0)]
    out = []
    for doc, compression in zip(DOCS, settings, strict=True):
        ctx, _ = tiny_engine.ingest(tiny_engine.encode_document(doc), compression)
        out.append(ctx)
    return out


def alone(engine, ctx: CompressedContext, question: str, params: SamplingParams) -> list[int]:
    """The reference: the single-request decode path."""
    return list(engine.generate(ctx, engine.encode_question(question), params))


async def collect(tokens: AsyncIterator[int]) -> list[int]:
    return [t async for t in tokens]


def scheduler(engine, thread: EngineWorker, **overrides: int) -> Scheduler:
    return Scheduler(engine.model, engine.eos_ids, thread, BatchingConfig(**overrides))


async def test_batched_greedy_equals_each_request_alone(tiny_engine, contexts):
    thread = EngineWorker(8)
    sched = scheduler(tiny_engine, thread, max_rows=16)
    cases = []
    for i in range(9):  # mixed contexts, ratios, questions and lengths
        ctx, question = contexts[i % 3], QUESTIONS[(i // 3) % 3]
        cases.append((ctx, question, SamplingParams(max_new_tokens=4 + 3 * (i % 4))))
    try:
        got = await asyncio.wait_for(
            asyncio.gather(
                *(
                    collect(sched.generate(c, tiny_engine.encode_question(q), p))
                    for c, q, p in cases
                )
            ),
            60,
        )
    finally:
        await sched.close()
        thread.close()
    want = [alone(tiny_engine, c, q, p) for c, q, p in cases]
    assert got == want
    assert [len(g) for g in got] == [p.max_new_tokens for _, _, p in cases]  # no EOS here


async def test_eos_ends_a_row_and_the_others_go_on(tiny_engine, contexts):
    params = SamplingParams(max_new_tokens=10)
    prompt = tiny_engine.encode_question(QUESTIONS[0])
    reference = alone(tiny_engine, contexts[0], QUESTIONS[0], params)
    eos = reference[3]  # pretend the 4th token is an end token
    thread = EngineWorker(8)
    sched = Scheduler(tiny_engine.model, {eos}, thread, BatchingConfig())
    try:
        short, full = await asyncio.wait_for(
            asyncio.gather(
                collect(sched.generate(contexts[0], prompt, params)),
                collect(sched.generate(contexts[1], tiny_engine.encode_question("Q?"), params)),
            ),
            60,
        )
    finally:
        await sched.close()
        thread.close()
    assert short == reference[: reference.index(eos)]
    other = alone(tiny_engine, contexts[1], "Q?", params)
    assert full == other[: other.index(eos)] if eos in other else full == other


async def test_a_cancelled_request_frees_its_row_and_the_others_are_unchanged(
    tiny_engine, contexts
):
    thread = EngineWorker(8)
    sched = scheduler(tiny_engine, thread)
    params = SamplingParams(max_new_tokens=12)
    prompts = [tiny_engine.encode_question(q) for q in QUESTIONS]
    try:
        quitter = sched.generate(contexts[0], prompts[0], SamplingParams(max_new_tokens=500))
        stayers = [
            asyncio.ensure_future(collect(sched.generate(contexts[i], prompts[i], params)))
            for i in (1, 2)
        ]
        first = [await anext(quitter) for _ in range(3)]
        await quitter.aclose()  # the client went away
        done = await asyncio.wait_for(asyncio.gather(*stayers), 60)
        for _ in range(100):
            if sched.batch_size == 0:
                break
            await asyncio.sleep(0.01)
        assert sched.batch_size == 0 and not sched.waiting
    finally:
        await sched.close()
        thread.close()
    assert first == alone(tiny_engine, contexts[0], QUESTIONS[0], params)[:3]
    assert done == [alone(tiny_engine, contexts[i], QUESTIONS[i], params) for i in (1, 2)]


async def test_seeded_top_p_sampling_is_per_row(tiny_engine, contexts):
    thread = EngineWorker(8)
    sched = scheduler(tiny_engine, thread)
    rows = [
        (contexts[0], QUESTIONS[0], SamplingParams(6, temperature=0.8, top_p=0.9, seed=1)),
        (contexts[1], QUESTIONS[1], SamplingParams(6, temperature=1.0, top_p=0.5, seed=2)),
        (contexts[2], QUESTIONS[2], SamplingParams(6)),
    ]
    try:
        got = await asyncio.wait_for(
            asyncio.gather(
                *(collect(sched.generate(c, tiny_engine.encode_question(q), p)) for c, q, p in rows)
            ),
            60,
        )
    finally:
        await sched.close()
        thread.close()
    assert got == [alone(tiny_engine, c, q, p) for c, q, p in rows]


async def test_the_queue_bound_refuses_and_the_kv_budget_serves_fifo(tiny_engine, contexts):
    thread = EngineWorker(8)
    # a budget that holds one row at a time: the rest wait, in order
    sched = scheduler(tiny_engine, thread, kv_budget_bytes=1, queue_size=3)
    prompt = tiny_engine.encode_question(QUESTIONS[0])
    finished: list[int] = []

    async def run(i: int) -> list[int]:
        tokens = await collect(sched.generate(contexts[i % 3], prompt, SamplingParams(4)))
        finished.append(i)
        return tokens

    try:
        tasks = [asyncio.ensure_future(run(i)) for i in range(3)]
        await asyncio.sleep(0)  # all three are waiting now (the loop has not run)
        with pytest.raises(QueueFullError):
            await anext(sched.generate(contexts[0], prompt, SamplingParams(4)))
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        await sched.close()
        thread.close()
    assert finished == [0, 1, 2]  # first come, first served
    assert results == [
        alone(tiny_engine, contexts[i], QUESTIONS[0], SamplingParams(4)) for i in range(3)
    ]


async def test_arrivals_are_prefilled_together_and_a_long_question_alone(
    tiny_engine, contexts, monkeypatch
):
    """Questions waiting together share one padded prefill forward (each row over its own
    context); a question longer than the chunk goes alone, chunk by chunk; answers are the
    same as alone either way."""
    from service.engine import rows as rows_module

    widths: list[tuple[int, int]] = []
    real = rows_module.rows_forward

    def counting(model, ids, *args):  # type: ignore[no-untyped-def]
        widths.append(tuple(ids.shape))
        return real(model, ids, *args)

    monkeypatch.setattr(rows_module, "rows_forward", counting)
    thread = EngineWorker(8)
    sched = scheduler(tiny_engine, thread, max_rows=16, prefill_chunk=40)
    long_question = "Tell me everything about the museum, the tickets and the hours. " * 4
    cases = [(contexts[i % 3], QUESTIONS[i % 3]) for i in range(4)] + [(contexts[0], long_question)]
    params = SamplingParams(max_new_tokens=3)
    try:
        got = await asyncio.wait_for(
            asyncio.gather(
                *(
                    collect(sched.generate(c, tiny_engine.encode_question(q), params))
                    for c, q in cases
                )
            ),
            60,
        )
    finally:
        await sched.close()
        thread.close()
    assert got == [alone(tiny_engine, c, q, params) for c, q in cases]
    long_tokens = len(tiny_engine.encode_question(long_question))
    assert long_tokens > 40
    assert max(rows for rows, _ in widths) >= 2  # several questions in one forward
    chunks = [width for rows, width in widths if rows == 1]
    assert len(chunks) == -(-long_tokens // 40)  # the long one alone, chunk by chunk
