"""The embedded service's storage budget and integrity, on the tiny model: per-tenant quotas,
the disk tier's capacity (an evicted context turns FAILED and registers again), and a damaged
stored object never answers (FAILED, then rebuilt by registering the document again)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import CompressionConfig, EngineConfig, ServiceConfig
from service.errors import ContextLostError, StorageQuotaExceededError, TooManyContextsError
from service.serving.embedded import EmbeddedContextService, build_embedded_service
from service.types import CreateContextRequest, QueryRequest, SamplingParams
from storage import DiskTier

TEXT = "The pass key is 77123. The museum opens at nine. The cafe closes at five. " * 6
COMPRESSION = CompressionConfig("kvzip", 0.3, 64)
QUESTION = QueryRequest("What is the pass key?", SamplingParams(max_new_tokens=6))


async def started(tiny_engine, data_dir: Path, **overrides) -> EmbeddedContextService:
    config = ServiceConfig(engine=EngineConfig(model="tiny"), data_dir=data_dir, **overrides)
    svc = build_embedded_service(config, engine=tiny_engine)
    await svc.start()
    return svc


def register(text: str, tenant: str = "") -> CreateContextRequest:
    return CreateContextRequest(text, compression=COMPRESSION, tenant=tenant)


def blob_file(data_dir: Path, cid: str) -> Path:
    return data_dir / "contexts" / f"{cid}.safetensors"


async def forget_copies(svc: EmbeddedContextService, cid: str) -> None:
    """Only the disk file is left (as after a restart)."""
    svc.resident.drop(cid)
    await svc.store.tier("memory").delete(f"{cid}.safetensors")


# -- quotas ------------------------------------------------------------------------------------


async def test_a_tenant_at_its_quota_of_contexts_is_refused_a_new_one(tiny_engine, tmp_path):
    svc = await started(tiny_engine, tmp_path, tenant_max_contexts=2)
    try:
        first, _ = await svc.create_context(register(TEXT + " one", "acme"))
        await svc.create_context(register(TEXT + " two", "acme"))
        with pytest.raises(TooManyContextsError, match="holds 2 contexts"):
            await svc.create_context(register(TEXT + " three", "acme"))
        again, created = await svc.create_context(register(TEXT + " one", "acme"))
        assert (again.id, created) == (first.id, False)  # a known document is never refused
        await svc.create_context(register(TEXT + " three", "other"))  # per tenant
        await svc.delete_context(first.id, "acme")
        _, created = await svc.create_context(register(TEXT + " three", "acme"))
        assert created
    finally:
        await svc.close()


async def test_contexts_in_flight_count_for_the_quota(tiny_engine, tmp_path):
    svc = await started(tiny_engine, tmp_path, tenant_max_contexts=1)
    try:
        pending = CreateContextRequest(TEXT + " a", compression=COMPRESSION, wait=False)
        info, _ = await svc.create_context(pending)
        assert info.state == "PROCESSING"
        with pytest.raises(TooManyContextsError):
            await svc.create_context(register(TEXT + " b"))
    finally:
        await svc.close()


async def test_a_tenant_at_its_quota_of_bytes_is_refused_a_new_context(tiny_engine, tmp_path):
    svc = await started(tiny_engine, tmp_path, tenant_max_bytes=1)
    try:
        info, _ = await svc.create_context(register(TEXT, "acme"))
        with pytest.raises(StorageQuotaExceededError, match=f"take {info.compression.bytes}"):
            await svc.create_context(register(TEXT + " more", "acme"))
        await svc.create_context(register(TEXT + " more", "other"))
    finally:
        await svc.close()


# -- the disk tier's capacity ------------------------------------------------------------------


async def test_an_evicted_context_turns_failed_at_once_and_registers_again(tiny_engine, tmp_path):
    svc = await started(tiny_engine, tmp_path)
    try:
        first, _ = await svc.create_context(register(TEXT))
        disk = svc.store.durable
        assert isinstance(disk, DiskTier)
        disk.capacity_bytes = disk.bytes_used + blob_file(tmp_path, first.id).stat().st_size // 2
        second, _ = await svc.create_context(register(TEXT + " and more"))  # evicts the first
        assert not blob_file(tmp_path, first.id).exists() and disk.evictions == 1
        shown = await svc.get_context(first.id)
        assert shown.state == "FAILED" and "evicted from the disk tier" in (shown.error or "")
        with pytest.raises(ContextLostError, match="register the same document again"):
            await svc.query(first.id, QUESTION)
        assert (await svc.query(second.id, QUESTION)).completion_tokens > 0
        again, created = await svc.create_context(register(TEXT))
        assert created and again.id == first.id and again.state == "READY"
        assert (await svc.query(first.id, QUESTION)).completion_tokens > 0
    finally:
        await svc.close()


# -- integrity ---------------------------------------------------------------------------------


def flip_4k_in_the_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = bytes(b ^ 0xFF for b in raw[middle : middle + 4096])
    path.write_bytes(bytes(raw))


def cut_the_tail(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5000])


@pytest.mark.parametrize("damage", [flip_4k_in_the_middle, cut_the_tail])
async def test_a_damaged_object_never_answers_and_the_document_registers_again(
    tiny_engine, tmp_path, damage
):
    svc = await started(tiny_engine, tmp_path)
    info, _ = await svc.create_context(register(TEXT))
    expected = await svc.query(info.id, QUESTION)
    await svc.close()
    damage(blob_file(tmp_path, info.id))

    restarted = await started(tiny_engine, tmp_path)  # the live probe's restart
    try:
        with pytest.raises(ContextLostError, match="no tier holds an intact copy"):
            await restarted.query(info.id, QUESTION)
        assert not blob_file(tmp_path, info.id).exists()  # dropped, not kept around
        shown = await restarted.get_context(info.id)
        assert shown.state == "FAILED" and "lost its stored cache" in (shown.error or "")
        with pytest.raises(ContextLostError):  # and stays refused, not served
            await restarted.query(info.id, QUESTION)
        again, created = await restarted.create_context(register(TEXT))
        assert created and again.id == info.id and again.state == "READY"
        await forget_copies(restarted, info.id)
        assert (await restarted.query(info.id, QUESTION)).answer == expected.answer
    finally:
        await restarted.close()
