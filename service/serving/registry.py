"""The context registry over a TieredStore: records, blobs, expiry and listing.

One context = a compressed blob under `<id>.safetensors` and a JSON record under
`<id>.json`. The blob is written first and the record last (the commit point), so a
record always points at a complete object. A record owns the expiry: an expired context
is purged (record first, then bytes) when it is looked up and by `purge_expired`. A record
that does not parse is skipped and logged, never a failure of every listing.

The embedded service keeps its records here; distributed workers write READY records here
too (with no expiry: in that mode the Redis record owns it), so that any worker reads what
another one wrote. (No torch here.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from service import telemetry
from service.config import ServiceConfig
from service.serving.records import ContextRecord, blob_key, record_key
from service.serving.validation import CheckedCreate
from storage import DiskTier, MemoryTier, Tier, TieredStore, TierUnavailableError

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
PROCESSING = "PROCESSING"


class ContextRegistry:
    """Stored contexts in one store (see the module docstring)."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store
        for tier in store.tiers:  # their counters and sizes in the metrics
            telemetry.track_tier(tier.name, tier)
        self.on_purge: list[Callable[[str], None]] = []  # e.g. drop the device-resident copy

    async def record(self, cid: str, tenant: str) -> ContextRecord | None:
        """The stored record if `tenant` may see it; an expired one is purged on sight."""
        record = await self._read(cid)
        if record is None or not record.visible_to(tenant):
            return None
        if record.expired():
            await self.purge(cid)
            return None
        return record

    async def ready(self, cid: str) -> ContextRecord | None:
        """The record of a context whose blob is stored too (an earlier ingest finished)."""
        record = await self._read(cid)
        if record is None or not await self.store.exists(blob_key(cid)):
            return None
        return record

    async def blob(self, cid: str) -> bytes | None:
        return await self.store.get(blob_key(cid))

    async def blob_view(self, cid: str) -> bytes | memoryview | None:
        """The stored object the fast way: the memory tier's bytes, else a read-only memory
        map of the disk tier's file (no copy; the page cache serves it), else through the
        tiers (Redis)."""
        key = blob_key(cid)
        for index, tier in enumerate(self.store.tiers):
            if tier.name == "memory" and (data := await tier.get(key)) is not None:
                return data
            if isinstance(tier, DiskTier) and (view := await tier.get_view(key)) is not None:
                shared = [t for t in self.store.tiers[:index] if t.name != "memory"]
                await self._promote(key, view, shared)  # reads promote (the Redis tier)
                return view
        return await self.store.get(key)

    async def _promote(self, key: str, view: memoryview, tiers: list[Tier]) -> None:
        for tier in tiers:
            try:
                if not await tier.exists(key):
                    await tier.put(key, bytes(view), ttl_s=self.store.promote_ttl_s)
            except TierUnavailableError as exc:
                log.warning("could not promote %s into %s: %s", key, tier.name, exc)

    async def commit(self, record: ContextRecord, blob: bytes) -> None:
        """Store the blob, then the record (the commit point)."""
        await self.store.put(blob_key(record.id), blob)
        await self.put(record)

    async def put(self, record: ContextRecord) -> None:
        await self.store.put(record_key(record.id), record.to_json())

    async def extend(self, record: ContextRecord, ttl_s: float) -> ContextRecord:
        """Keep a stored context alive at least `ttl_s` more seconds (registered again)."""
        expire = extended_expiry(record.expire_time, ttl_s)
        if expire is None:
            return record
        record = replace(record, expire_time=expire)
        await self.put(record)
        return record

    async def purge(self, cid: str) -> None:
        """Remove a context: the record first (invisible), then the bytes."""
        await self.store.delete(record_key(cid))
        await self.store.delete(blob_key(cid))
        for hook in self.on_purge:
            hook(cid)

    async def records(self, tenant: str) -> list[ContextRecord]:
        """Every live record `tenant` may see (expired ones are purged on the way)."""
        found = []
        for cid in await self._ids():
            if (record := await self.record(cid, tenant)) is not None:
                found.append(record)
        return found

    async def purge_expired(self) -> int:
        """Purge every expired context; how many went."""
        purged = 0
        for cid in await self._ids():
            record = await self._read(cid)
            if record is not None and record.expired():
                await self.purge(cid)
                purged += 1
        return purged

    async def _ids(self) -> list[str]:
        keys = await self.store.keys("ctx_")
        return [k.removesuffix(RECORD_SUFFIX) for k in keys if k.endswith(RECORD_SUFFIX)]

    async def _read(self, cid: str) -> ContextRecord | None:
        data = await self.store.get(record_key(cid))
        if data is None:
            return None
        try:
            record = ContextRecord.from_json(data)
            record.info()  # its times and numbers parse too
            return record
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # out of shape
            log.error("record of %s does not parse (%s); skipped", cid, exc)
            return None


def local_store(config: ServiceConfig) -> TieredStore:
    """The embedded store: memory LRU -> disk under the data dir."""
    memory = MemoryTier(config.memory_cache_bytes)
    disk = DiskTier(Path(config.data_dir) / "contexts")
    return TieredStore([memory, disk])


def extended_expiry(expire_time: str | None, ttl_s: float) -> str | None:
    """The later expiry a registration of a stored context asks for, or None when the
    current one (`expire_time`, None = never) already lasts at least `ttl_s`."""
    wanted = datetime.now(UTC) + timedelta(seconds=ttl_s)
    if expire_time is None or datetime.fromisoformat(expire_time) >= wanted:
        return None
    return wanted.isoformat()


def processing_record(
    cid: str, checked: CheckedCreate, model: str, context_tokens: int = 0, prefix_tokens: int = 0
) -> ContextRecord:
    """The record of a registration whose ingest has not finished (state PROCESSING)."""
    now = datetime.now(UTC)
    request, compression = checked.request, checked.compression
    return ContextRecord(
        id=cid,
        tenant=request.tenant,
        display_name=request.display_name,
        model=model,
        state=PROCESSING,
        create_time=now.isoformat(),
        context_tokens=context_tokens,
        prefix_tokens=prefix_tokens,
        method=compression.method,
        ratio=compression.ratio,
        chunk_size=compression.chunk_size,
        quantization=compression.quantization,
        kept_kv_pairs=0,
        total_kv_pairs=0,
        bytes=0,
        expire_time=(now + timedelta(seconds=checked.ttl_s)).isoformat(),
        progress=0.0,
        system=request.system,
    )
