"""Durability of the embedded service on the tiny model: a record lost from disk is rebuilt
from the stored object that describes it (at start and on a lookup), tenants stay apart, an
expired object is purged rather than revived, and a PATCH racing a DELETE leaves nothing
half there."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.config import CompressionConfig, EngineConfig, ServiceConfig
from service.errors import ContextNotFoundError
from service.metadata import read_metadata
from service.serving.embedded import EmbeddedContextService, build_embedded_service
from service.serving.records import blob_key, described_record, record_key
from service.types import CreateContextRequest, QueryRequest, SamplingParams
from storage.disk_tier import HEADER_BYTES

TEXT = "The museum opens at nine. Tickets cost twelve euros. The cafe closes at five. " * 8
QUESTION = QueryRequest(
    "When does the museum open?", SamplingParams(max_new_tokens=6), tenant="team-a"
)


async def _started(tiny_engine, data_dir: Path, **overrides) -> EmbeddedContextService:
    config = ServiceConfig(engine=EngineConfig(model="tiny"), data_dir=data_dir, **overrides)
    svc = build_embedded_service(config, engine=tiny_engine)
    await svc.start()
    return svc


async def _register(svc: EmbeddedContextService, **fields) -> str:
    request = CreateContextRequest(
        TEXT, "museum", CompressionConfig("kvzip", 0.3, 64), tenant="team-a", **fields
    )
    info, _ = await svc.create_context(request)
    return info.id


def _files(data_dir: Path, cid: str) -> set[str]:
    return {p.name for p in (data_dir / "contexts").glob(f"{cid}*")}


async def test_the_stored_object_describes_its_record(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path)
    cid = await _register(svc, system="Answer briefly.")
    record = await svc.registry.record(cid, "team-a")
    blob = (tmp_path / "contexts" / blob_key(cid)).read_bytes()[HEADER_BYTES:]  # past the frame
    assert described_record(cid, read_metadata(blob), len(blob)) == record
    assert described_record("ctx_" + "0" * 32, read_metadata(blob), len(blob)) is None
    await svc.close()


async def test_a_record_deleted_from_disk_is_rebuilt_at_start(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path)
    cid = await _register(svc)
    info = await svc.get_context(cid, "team-a")
    answer = await svc.query(cid, QUESTION)
    await svc.close()
    (tmp_path / "contexts" / record_key(cid)).unlink()

    restarted = await _started(tiny_engine, tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not (await restarted.list_contexts("team-a")).contexts:  # no lookup: the scan
            assert time.monotonic() < deadline, "the start-up scan rebuilt nothing"
            await asyncio.sleep(0.02)
        assert record_key(cid) in _files(tmp_path, cid)
        assert await restarted.get_context(cid, "team-a") == info
        assert (await restarted.query(cid, QUESTION)).answer == answer.answer
        with pytest.raises(ContextNotFoundError):
            await restarted.get_context(cid, "team-b")
    finally:
        await restarted.close()


async def test_a_lookup_rebuilds_a_missing_record_for_its_tenant_only(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path)
    try:
        cid = await _register(svc)
        info = await svc.get_context(cid, "team-a")
        answer = await svc.query(cid, QUESTION)
        await svc.store.delete(record_key(cid))  # gone from every tier; the object stays
        svc.resident.drop(cid)
        with pytest.raises(ContextNotFoundError):
            await svc.get_context(cid, "team-b")
        with pytest.raises(ContextNotFoundError):
            await svc.query(cid, QueryRequest("When?", tenant="team-b"))
        assert await svc.get_context(cid, "team-a") == info
        assert (await svc.query(cid, QUESTION)).answer == answer.answer
    finally:
        await svc.close()


async def test_an_expired_object_is_purged_not_revived(tiny_engine, tmp_path):
    svc = await _started(tiny_engine, tmp_path)
    try:
        cid = await _register(svc, ttl_seconds=0.3)
        await svc.store.delete(record_key(cid))
        await asyncio.sleep(0.35)
        with pytest.raises(ContextNotFoundError):
            await svc.get_context(cid, "team-a")
        assert not _files(tmp_path, cid)
    finally:
        await svc.close()


async def test_a_patch_racing_a_delete_leaves_no_record_without_its_blob(tiny_engine, tmp_path):
    """The PATCH is held between its read and its write while the DELETE runs: the DELETE
    must wait for it (or the PATCH would write the record back after the purge)."""
    svc = await _started(tiny_engine, tmp_path)
    try:
        cid = await _register(svc)
        registry, put = svc.registry, svc.registry.put
        paused, release = asyncio.Event(), asyncio.Event()

        async def held_put(record):
            paused.set()
            await release.wait()
            await put(record)

        registry.put = held_put  # type: ignore[method-assign]
        later = datetime.now(UTC) + timedelta(hours=2)
        patch = asyncio.create_task(svc.update_context(cid, later, "team-a"))
        await paused.wait()
        registry.put = put  # type: ignore[method-assign]
        delete = asyncio.create_task(svc.delete_context(cid, "team-a"))
        locks = getattr(registry, "locks", None)
        while not delete.done() and not (locks is not None and locks.waiting(cid)):
            await asyncio.sleep(0)  # the DELETE runs until it ends or waits for the PATCH
        release.set()
        await asyncio.gather(patch, delete, return_exceptions=True)
        assert not _files(tmp_path, cid)  # the DELETE came last: nothing is left
        with pytest.raises(ContextNotFoundError):
            await svc.get_context(cid, "team-a")
    finally:
        await svc.close()
