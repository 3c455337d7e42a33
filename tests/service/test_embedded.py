"""The embedded context service end to end on the tiny model: ids, tiers, restart, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.config import CompressionConfig, EngineConfig, ServiceConfig
from service.errors import (
    ContextNotFoundError,
    DocumentTooLongError,
    InvalidInputError,
    QueueFullError,
)
from service.serving.embedded import EmbeddedContextService, build_embedded_service
from service.types import CreateContextRequest, QueryRequest, SamplingParams

TEXT = "The museum opens at nine. Tickets cost twelve euros. The cafe closes at five. " * 8


def _service(tiny_engine, data_dir: Path, **overrides) -> EmbeddedContextService:
    config = ServiceConfig(engine=EngineConfig(model="tiny"), data_dir=data_dir, **overrides)
    return build_embedded_service(config, engine=tiny_engine)


async def test_register_is_idempotent_and_survives_restart(tiny_engine, tmp_path):
    svc = _service(tiny_engine, tmp_path)
    await svc.start()
    request = CreateContextRequest(TEXT, "museum", CompressionConfig("kvzip", 0.3, 64))
    info, created = await svc.create_context(request)
    again, created_again = await svc.create_context(request)
    assert created and not created_again and again.id == info.id
    assert info.id.startswith("ctx_") and len(info.id) == 36
    assert abs(info.compression.kept_fraction - 0.3) < 0.01
    question = QueryRequest("When does the museum open?", SamplingParams(max_new_tokens=8))
    first = await svc.query(info.id, question)
    assert (
        first.cached_tokens
        == info.context_tokens + tiny_engine.encode_document("").prefix_ids.__len__()
    )
    assert first.completion_tokens <= 8
    await svc.close()

    restarted = _service(tiny_engine, tmp_path)  # new process state: only the disk remains
    await restarted.start()
    assert (await restarted.get_context(info.id)).compression == info.compression
    second = await restarted.query(info.id, question)
    assert second.answer == first.answer
    assert restarted.resident.misses == 1  # read from disk, not re-ingested
    await restarted.close()


async def test_different_settings_or_tenant_give_different_ids(tiny_engine, tmp_path):
    svc = _service(tiny_engine, tmp_path)
    await svc.start()
    a, _ = await svc.create_context(
        CreateContextRequest(TEXT, compression=CompressionConfig("kvzip", 0.3, 64))
    )
    b, _ = await svc.create_context(
        CreateContextRequest(TEXT, compression=CompressionConfig("kvzip", 0.5, 64))
    )
    c, _ = await svc.create_context(
        CreateContextRequest(TEXT, compression=CompressionConfig("kvzip", 0.3, 64), tenant="t2")
    )
    assert len({a.id, b.id, c.id}) == 3
    with pytest.raises(ContextNotFoundError):
        await svc.get_context(c.id, tenant="")
    await svc.close()


async def test_delete_removes_every_tier(tiny_engine, tmp_path):
    svc = _service(tiny_engine, tmp_path)
    await svc.start()
    info, _ = await svc.create_context(
        CreateContextRequest(TEXT, compression=CompressionConfig("none", 1.0))
    )
    assert info.compression.kept_fraction == 1.0 and info.compression.method == "none"
    await svc.delete_context(info.id)
    assert not list((tmp_path / "contexts").glob(f"{info.id}*"))
    for call in (
        svc.get_context(info.id),
        svc.delete_context(info.id),
        svc.query(info.id, QueryRequest("x")),
    ):
        with pytest.raises(ContextNotFoundError):
            await call
    await svc.close()


async def test_bad_input_is_refused_before_the_engine(tiny_engine, tmp_path):
    svc = _service(tiny_engine, tmp_path, max_new_tokens_limit=16)
    await svc.start()
    with pytest.raises(InvalidInputError):
        await svc.create_context(CreateContextRequest("  \n\t "))
    with pytest.raises(InvalidInputError, match="ratio"):
        await svc.create_context(
            CreateContextRequest(TEXT, compression=CompressionConfig("kvzip", 1.5))
        )
    with pytest.raises(DocumentTooLongError, match=str(tiny_engine.max_context_tokens)):
        await svc.create_context(CreateContextRequest("word " * 5000))
    info, _ = await svc.create_context(
        CreateContextRequest(TEXT, compression=CompressionConfig("none", 1.0))
    )
    with pytest.raises(InvalidInputError, match="max_new_tokens must be <= 16. Given: 17"):
        await svc.query(info.id, QueryRequest("q", SamplingParams(max_new_tokens=17)))
    assert not list((tmp_path / "contexts").glob("*.tmp*"))
    await svc.close()


async def test_concurrent_identical_registrations_ingest_once(tiny_engine, tmp_path):
    svc = _service(tiny_engine, tmp_path)
    await svc.start()
    before = tiny_engine.reconstruction_passes
    request = CreateContextRequest(
        TEXT + " once", compression=CompressionConfig("kvzip", 0.3, 2000)
    )
    results = await asyncio.gather(*(svc.create_context(request) for _ in range(4)))
    assert len({info.id for info, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert tiny_engine.reconstruction_passes - before == 1
    await svc.close()


async def test_full_queue_answers_queue_full(tiny_engine, tmp_path):
    svc = _service(tiny_engine, tmp_path, queue_size=1)
    await svc.start()
    texts = [f"{TEXT} variant {i}" for i in range(3)]
    results = await asyncio.gather(
        *(svc.create_context(CreateContextRequest(t)) for t in texts), return_exceptions=True
    )
    assert any(isinstance(r, QueueFullError) for r in results)
    assert any(isinstance(r, tuple) for r in results)
    await svc.close()


# --- lifecycle: system prefix, expiry, listing, asynchronous ingest ------------------------------


async def _started(tiny_engine, data_dir: Path, **overrides) -> EmbeddedContextService:
    svc = _service(tiny_engine, data_dir, **overrides)
    await svc.start()
    return svc


def _stored(data_dir: Path, cid: str) -> list[Path]:
    return list((data_dir / "contexts").glob(f"{cid}*"))


async def test_system_instruction_joins_the_prefix_and_the_id(tiny_engine, tmp_path):
    from service.engine.prompt import build_layout, question_ids

    svc = await _started(tiny_engine, tmp_path)
    plain, _ = await svc.create_context(CreateContextRequest(TEXT))
    system = "You are a museum guide. Answer in one word."
    guided, created = await svc.create_context(CreateContextRequest(TEXT, system=system))
    assert created and guided.id != plain.id
    assert guided.context_tokens == plain.context_tokens
    prefix_ids = tiny_engine.encode_document("", system).prefix_ids
    prefix = len(prefix_ids)
    assert system in tiny_engine.tokenizer.decode(prefix_ids)
    assert system not in tiny_engine.tokenizer.decode(tiny_engine.encode_document("").prefix_ids)
    record = await svc.registry.record(guided.id, "")
    assert record is not None and record.system == system and record.prefix_tokens == prefix
    expected = question_ids(
        build_layout(tiny_engine.tokenizer, system), tiny_engine.tokenizer, "Q?"
    )
    assert svc.pipeline.question_ids(system, "Q?") == expected
    result = await svc.query(guided.id, QueryRequest("When?", SamplingParams(max_new_tokens=4)))
    assert result.cached_tokens == prefix + guided.context_tokens
    again, created_again = await svc.create_context(CreateContextRequest(TEXT, system=system))
    assert (again.id, created_again) == (guided.id, False)
    await svc.close()


async def test_expired_contexts_are_404_and_purged_from_every_tier(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path)
    short, _ = await svc.create_context(CreateContextRequest(TEXT, ttl_seconds=0.3))
    swept, _ = await svc.create_context(CreateContextRequest(TEXT + " swept", ttl_seconds=0.3))
    kept, _ = await svc.create_context(CreateContextRequest(TEXT + " kept"))
    assert short.expire_time is not None
    remaining = (short.expire_time - short.create_time).total_seconds()
    assert 0.2 < remaining <= 0.3
    assert abs((kept.expire_time - kept.create_time).total_seconds() - 3600) < 1
    assert _stored(tmp_path, short.id)
    await asyncio.sleep(0.35)
    with pytest.raises(ContextNotFoundError):
        await svc.get_context(short.id)
    assert not _stored(tmp_path, short.id)
    assert short.id not in [key for key in await svc.store.tier("memory").keys()]
    assert svc.resident.get(short.id) is None
    assert await svc.purge_expired() == 1  # the one nobody looked up
    assert not _stored(tmp_path, swept.id) and _stored(tmp_path, kept.id)
    await svc.close()


async def test_ttl_outside_the_bounds_is_refused(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path, max_ttl_s=100.0)
    for ttl in (0.0, -1.0, 101.0):
        with pytest.raises(InvalidInputError, match="ttl_seconds must be in"):
            await svc.create_context(CreateContextRequest(TEXT, ttl_seconds=ttl))
    await svc.close()


async def test_update_changes_only_the_expiry_and_persists(tiny_engine, tmp_path):
    from datetime import UTC, datetime, timedelta

    svc = await _started(tiny_engine, tmp_path, max_ttl_s=7200.0)
    info, _ = await svc.create_context(CreateContextRequest(TEXT, "museum"))
    later = datetime.now(UTC) + timedelta(hours=1, minutes=30)
    updated = await svc.update_context(info.id, later)
    assert updated.expire_time == later
    assert (updated.display_name, updated.compression) == (info.display_name, info.compression)
    with pytest.raises(InvalidInputError, match="in the future"):
        await svc.update_context(info.id, datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(InvalidInputError, match="at most 7200 seconds"):
        await svc.update_context(info.id, datetime.now(UTC) + timedelta(hours=3))
    with pytest.raises(ContextNotFoundError):
        await svc.update_context(info.id, later, tenant="other")
    await svc.close()
    restarted = await _started(tiny_engine, tmp_path)
    assert (await restarted.get_context(info.id)).expire_time == later
    await restarted.close()


async def test_registering_again_extends_the_expiry(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path)
    first, _ = await svc.create_context(CreateContextRequest(TEXT, ttl_seconds=60))
    longer, created = await svc.create_context(CreateContextRequest(TEXT, ttl_seconds=600))
    shorter, _ = await svc.create_context(CreateContextRequest(TEXT, ttl_seconds=10))
    assert not created and longer.id == first.id
    assert longer.expire_time > first.expire_time
    assert shorter.expire_time == longer.expire_time  # never shortened by a re-registration
    await svc.close()


async def test_listing_pages_oldest_first_per_tenant(tiny_engine, tmp_path):
    from service.types import ANY_TENANT

    svc = await _started(tiny_engine, tmp_path)
    ids = []
    for i in range(3):
        info, _ = await svc.create_context(CreateContextRequest(f"{TEXT} {i}", f"doc {i}"))
        ids.append(info.id)
    other, _ = await svc.create_context(CreateContextRequest(TEXT, tenant="team-b"))
    first = await svc.list_contexts(page_size=2)
    assert [info.id for info in first.contexts] == ids[:2] and first.next_page_token
    second = await svc.list_contexts(page_size=2, page_token=first.next_page_token)
    assert [info.id for info in second.contexts] == ids[2:] and second.next_page_token is None
    assert [info.id for info in (await svc.list_contexts("team-b")).contexts] == [other.id]
    everyone = await svc.list_contexts(ANY_TENANT, page_size=10)
    assert {info.id for info in everyone.contexts} == {*ids, other.id}
    with pytest.raises(InvalidInputError, match="page_token"):
        await svc.list_contexts(page_token="not-a-token")
    with pytest.raises(ContextNotFoundError):  # another tenant's id is not there
        await svc.get_context(other.id)
    assert (await svc.get_context(other.id, ANY_TENANT)).id == other.id
    await svc.close()


async def test_wait_false_answers_processing_then_ready(tiny_engine, tmp_path):
    import time

    from service.errors import ContextNotReadyError

    svc = await _started(tiny_engine, tmp_path)
    blocker = asyncio.ensure_future(svc.worker.run(time.sleep, 0.4))  # the engine is busy
    await asyncio.sleep(0)
    request = CreateContextRequest(
        TEXT * 3, compression=CompressionConfig("kvzip", 0.3, 64), wait=False
    )
    info, created = await svc.create_context(request)
    assert created and (info.state, info.progress) == ("PROCESSING", 0.0)
    assert info.expire_time is not None and info.context_tokens > 0
    assert (await svc.get_context(info.id)).state == "PROCESSING"
    assert [c.id for c in (await svc.list_contexts()).contexts] == [info.id]
    again, created_again = await svc.create_context(request)
    assert (again.id, again.state, created_again) == (info.id, "PROCESSING", False)
    with pytest.raises(ContextNotReadyError, match="still processing"):
        await svc.query(info.id, QueryRequest("When?"))
    seen = []
    while (current := await svc.get_context(info.id)).state == "PROCESSING":
        seen.append(current.progress)
        await asyncio.sleep(0.005)
    await blocker
    assert current.state == "READY" and current.progress == 1.0
    assert seen == sorted(seen) and seen[0] == 0.0
    assert current.compression.kept_kv_pairs > 0
    await svc.close()


async def test_delete_while_processing_stops_the_ingest(tiny_engine, tmp_path):
    import time

    from service import telemetry

    aborted = telemetry.INGESTS.labels("aborted")._value.get()
    svc = await _started(tiny_engine, tmp_path)
    blocker = asyncio.ensure_future(svc.worker.run(time.sleep, 0.2))
    await asyncio.sleep(0)
    request = CreateContextRequest(
        TEXT, compression=CompressionConfig("kvzip", 0.3, 64), wait=False
    )
    info, _ = await svc.create_context(request)
    await svc.delete_context(info.id)
    with pytest.raises(ContextNotFoundError):
        await svc.get_context(info.id)
    await blocker
    for _ in range(1000):  # stopped at its first scoring chunk
        if svc.worker.queued == 0:
            break
        await asyncio.sleep(0.01)
    assert svc.worker.queued == 0
    assert telemetry.INGESTS.labels("aborted")._value.get() == aborted + 1
    assert not _stored(tmp_path, info.id)
    await svc.close()


async def test_an_unwaited_ingest_that_fails_shows_failed(tiny_engine, tmp_path, monkeypatch):
    from service.errors import ContextNotReadyError

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory on the engine")

    svc = await _started(tiny_engine, tmp_path)
    monkeypatch.setattr(tiny_engine, "ingest", broken)
    info, _ = await svc.create_context(CreateContextRequest(TEXT, wait=False))
    while (current := await svc.get_context(info.id)).state == "PROCESSING":
        await asyncio.sleep(0.01)
    assert current.state == "FAILED" and "RuntimeError" in (current.error or "")
    with pytest.raises(ContextNotReadyError, match="failed: internal error while ingesting"):
        await svc.query(info.id, QueryRequest("When?"))
    with pytest.raises(RuntimeError):  # a waited ingest raises instead, and leaves nothing
        await svc.create_context(CreateContextRequest(TEXT + " waited"))
    await svc.delete_context(info.id)
    with pytest.raises(ContextNotFoundError):
        await svc.get_context(info.id)
    await svc.close()


async def test_document_token_cap_is_413_material(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path, max_document_tokens=20)
    with pytest.raises(DocumentTooLongError, match="at most 20"):
        await svc.create_context(CreateContextRequest(TEXT))
    await svc.close()


# --- streaming, stop sequences, cancellation ------------------------------------------------------


async def _ready_context(svc: EmbeddedContextService) -> str:
    info, _ = await svc.create_context(
        CreateContextRequest(TEXT, compression=CompressionConfig("none", 1.0))
    )
    return info.id


async def test_stream_query_deltas_add_up_to_the_answer(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path)
    cid = await _ready_context(svc)
    request = QueryRequest("When does it open?", SamplingParams(max_new_tokens=12))
    events = [event async for event in svc.stream_query(cid, request)]
    deltas, final = events[:-1], events[-1]
    assert final.result is not None and all(e.result is None and e.delta for e in deltas)
    assert "".join(e.delta for e in deltas) == final.result.answer
    whole = await svc.query(cid, request)  # greedy: the same answer without streaming
    assert (whole.answer, whole.completion_tokens) == (
        final.result.answer,
        final.result.completion_tokens,
    )
    plain = await svc.query(cid, request)
    assert plain.answer == final.result.answer
    assert plain.completion_tokens == final.result.completion_tokens
    await svc.close()


async def test_stop_sequence_ends_the_answer_before_it(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path)
    cid = await _ready_context(svc)
    full = await svc.query(cid, QueryRequest("Tell me.", SamplingParams(max_new_tokens=24)))
    text = full.answer
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if text[i : i + 3].strip())
    cut = text.index(stop)
    sampling = SamplingParams(max_new_tokens=24, stop=(stop,))
    events = [event async for event in svc.stream_query(cid, QueryRequest("Tell me.", sampling))]
    result = events[-1].result
    assert result is not None
    assert result.answer == text[:cut] == "".join(e.delta for e in events[:-1])
    assert result.finish_reason == "stop"
    assert result.completion_tokens <= full.completion_tokens
    await svc.close()


async def test_closing_the_stream_cancels_the_generation(tiny_engine, tmp_path):
    from service import telemetry

    svc = await _started(tiny_engine, tmp_path)
    cid = await _ready_context(svc)
    before = telemetry.QUERIES_CANCELLED._value.get()
    tokens_before = telemetry.GENERATED_TOKENS._value.get()
    stream = svc.stream_query(cid, QueryRequest("Go on.", SamplingParams(max_new_tokens=500)))
    for _ in range(3):
        await anext(stream)
    await stream.aclose()
    assert telemetry.QUERIES_CANCELLED._value.get() == before + 1
    for _ in range(200):  # the engine thread lets go of the job at its next token
        if svc.worker.queued == 0:
            break
        await asyncio.sleep(0.01)
    assert svc.worker.queued == 0
    assert telemetry.GENERATED_TOKENS._value.get() - tokens_before < 20
    await svc.close()


async def test_sampling_is_validated_and_seeded(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path)
    cid = await _ready_context(svc)
    with pytest.raises(InvalidInputError, match="top_p"):
        await svc.query(cid, QueryRequest("q", SamplingParams(top_p=0.0)))
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = await svc.query(cid, QueryRequest("Say something.", sampled))
    b = await svc.query(cid, QueryRequest("Say something.", sampled))
    assert a.answer == b.answer
    await svc.close()


async def test_a_context_stored_under_a_pre_0_2_id_still_answers(tiny_engine, tmp_path):
    """The embedded id used to hash token ids; such a stored context keeps its id: lookups,
    queries and a new registration of the same document all find it."""
    from dataclasses import replace

    from service.serving.records import blob_key, record_key
    from service.serving.validation import validated_create

    svc = await _started(tiny_engine, tmp_path)
    request = CreateContextRequest(TEXT, compression=CompressionConfig("kvzip", 0.3, 64))
    info, _ = await svc.create_context(request)
    question = QueryRequest("When does the museum open?", SamplingParams(max_new_tokens=6))
    expected = await svc.query(info.id, question)
    await svc.close()

    old = _service(tiny_engine, tmp_path)  # the layout the previous code left on disk
    checked = validated_create(request, old.config)
    doc = tiny_engine.encode_document(TEXT)
    await old.start()
    legacy = old.pipeline.legacy_id(checked, doc)
    assert legacy != info.id
    record = await old.registry.record(info.id, "")
    blob = await old.store.get(blob_key(info.id))
    assert record is not None and blob is not None
    await old.registry.purge(info.id)
    await old.store.put(blob_key(legacy), blob)
    await old.store.put(record_key(legacy), replace(record, id=legacy).to_json())
    await old.close()

    upgraded = await _started(tiny_engine, tmp_path)
    assert (await upgraded.get_context(legacy)).state == "READY"
    assert (await upgraded.query(legacy, question)).answer == expected.answer
    again, created = await upgraded.create_context(request)
    assert (again.id, created) == (legacy, False)
    await upgraded.close()


async def test_concurrent_loads_of_one_context_read_it_once(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path)
    cid = await _ready_context(svc)
    svc.resident.drop(cid)
    await svc.store.tier("memory").delete(f"{cid}.safetensors")  # only the disk holds it
    reads = []
    opened = svc.registry.open_blob

    async def counted(key: str):
        reads.append(key)
        await asyncio.sleep(0.05)  # the read is in flight while the others ask
        return await opened(key)

    svc.registry.open_blob = counted  # type: ignore[method-assign]
    loaded = await asyncio.gather(*(svc.pipeline.load(cid) for _ in range(3)))
    assert reads == [cid] and loaded[0] is loaded[1] is loaded[2]
    pending = await opened(cid)
    assert pending is not None and isinstance(pending.data, memoryview)  # a map of the file
    assert await pending.settled is pending.data
    await svc.close()
