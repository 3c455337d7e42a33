"""The context registry over a TieredStore: records, blobs, expiry and listing.

One context = a compressed blob under `<id>.safetensors` and a JSON record under
`<id>.json`. The blob is written first and the record last (the commit point), so a
record always points at a complete object. A record owns the expiry: an expired context
is purged (record first, then bytes) when it is looked up and by `purge_expired`. A record
that does not parse is skipped and logged, never a failure of every listing.

The embedded service keeps its records here; distributed workers write READY records here
too (with no expiry: in that mode the Redis record owns it), so that any worker reads what
another one wrote. (No torch here.)

A context whose stored cache is gone is `lost`: evicted by the disk tier to stay within its
capacity (the tier reports each eviction here at once; only blobs are evictable, records
stay), or found missing, damaged in every tier that held it, or unparsable by a read. Its
bytes leave every tier and its record turns FAILED with the reason (a record without an
expiry of its own, a worker's, is removed instead: the Redis record says FAILED); the
`on_lost` hooks hear of it. Registering the same document again rebuilds it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from service import telemetry
from service.config import ServiceConfig
from service.errors import ContextLostError, ContextNotFoundError, StorageFullError
from service.serving.quota import Usage, usage_of
from service.serving.records import (
    BLOB_SUFFIX,
    FAILED,
    PROCESSING,
    READY,
    ContextRecord,
    blob_key,
    is_blob_key,
    record_key,
)
from service.serving.validation import CheckedCreate
from storage import DiskTier, MemoryTier, TieredStore, TierFullError

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
EVICTED = "evicted from the disk tier to keep it within its capacity"


class ContextRegistry:
    """Stored contexts in one store (see the module docstring)."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store
        for tier in store.tiers:  # their counters and sizes in the metrics
            telemetry.track_tier(tier.name, tier)
        self.on_purge: list[Callable[[str], None]] = []  # e.g. drop the device-resident copy
        self.on_lost: list[Callable[[str, ContextLostError], Awaitable[object]]] = []
        for tier in store.tiers:
            if isinstance(tier, DiskTier):
                tier.on_evict.append(self._evicted)

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
        if record is None or record.state != READY:
            return None
        return record if await self.store.exists(blob_key(cid)) else None

    async def blob_view(self, cid: str) -> bytes | memoryview | None:
        """The stored object the fast way (see TieredStore.get_view): the memory tier's
        bytes, else a read-only memory map of the disk tier's file, else through Redis."""
        return await self.store.get_view(blob_key(cid))

    async def commit(self, record: ContextRecord, blob: bytes, ttl_s: float | None = None) -> None:
        """Store the blob, then the record (the commit point), both expiring from the tiers
        after `ttl_s` (None: when the record is purged). StorageFullError when the disk
        tier cannot hold the blob."""
        await self._store(blob_key(record.id), blob, ttl_s)
        await self._store(record_key(record.id), record.to_json(), ttl_s)

    async def _store(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        try:
            await self.store.put(key, data, ttl_s)
        except TierFullError as exc:
            raise StorageFullError(f"{key} ({len(data)} bytes) cannot be stored: {exc}") from exc

    async def retain(self, cid: str, ttl_s: float) -> None:
        """Keep the stored context at least `ttl_s` more seconds (its expiry was extended)."""
        for key in (blob_key(cid), record_key(cid)):
            await self.store.retain(key, ttl_s)

    async def lost(self, cid: str, reason: str) -> ContextLostError | ContextNotFoundError:
        """Drop a context whose stored cache is gone (see the module docstring); the error
        that says so (ContextNotFoundError when its record went too: deleted meanwhile)."""
        error = ContextLostError(cid, reason)
        await self.store.delete(blob_key(cid))
        for hook in self.on_purge:
            hook(cid)
        record = await self._read(cid)
        if record is not None and record.state == READY:
            log.error("%s", error)
            if record.expire_time is None:  # a worker's copy: the Redis record says FAILED
                await self.store.delete(record_key(cid))
            else:
                await self.put(replace(record, state=FAILED, error=str(error)))
        for lost_hook in self.on_lost:
            await lost_hook(cid, error)
        return error if record is not None else ContextNotFoundError(cid)

    async def _evicted(self, key: str) -> None:
        if is_blob_key(key):
            await self.lost(key.removesuffix(BLOB_SUFFIX), EVICTED)

    async def usage(self, tenant: str, also: Iterable[ContextRecord] = ()) -> Usage:
        """What `tenant` holds (see service.serving.quota): its live stored contexts, and
        those of `also` (in flight). Expired ones count for nothing (and stay for the
        sweep: counting changes nothing)."""
        held: dict[str, ContextRecord] = {}
        for cid in await self._ids():
            record = await self._read(cid)
            if record is not None and record.tenant == tenant and not record.expired():
                held[cid] = record
        held |= {r.id: r for r in also if r.tenant == tenant}
        return usage_of(held.values())

    async def put(self, record: ContextRecord) -> None:
        await self._store(record_key(record.id), record.to_json())

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
    disk = DiskTier(
        Path(config.data_dir) / "contexts",
        capacity_bytes=config.disk_capacity_bytes,
        evictable=is_blob_key,
    )
    return TieredStore([memory, disk])


def extended_expiry(expire_time: str | None, ttl_s: float) -> str | None:
    """The later expiry a registration of a stored context asks for, or None when the
    current one (`expire_time`, None = never) already lasts at least `ttl_s`."""
    wanted = datetime.now(UTC) + timedelta(seconds=ttl_s)
    if expire_time is None or datetime.fromisoformat(expire_time) >= wanted:
        return None
    return wanted.isoformat()


def time_left(expire_time: str | None) -> float | None:
    """Seconds until `expire_time` (ISO 8601; at least 1), None for never."""
    if expire_time is None:
        return None
    left = (datetime.fromisoformat(expire_time) - datetime.now(UTC)).total_seconds()
    return max(left, 1.0)


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
