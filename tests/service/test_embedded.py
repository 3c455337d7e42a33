"""The embedded context service end to end on the tiny model: ids, tiers, restart, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.config import CompressionConfig, EngineConfig, ServiceConfig
from service.embedded import EmbeddedContextService
from service.errors import (
    ContextNotFoundError,
    DocumentTooLongError,
    InvalidInputError,
    QueueFullError,
)
from service.types import CreateContextRequest, QueryRequest, SamplingParams

TEXT = "The museum opens at nine. Tickets cost twelve euros. The cafe closes at five. " * 8


def _service(tiny_engine, data_dir: Path, **overrides) -> EmbeddedContextService:
    config = ServiceConfig(engine=EngineConfig(model="tiny"), data_dir=data_dir, **overrides)
    return EmbeddedContextService(config, engine=tiny_engine)


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
