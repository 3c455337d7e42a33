"""The context registry over a TieredStore: records, blobs, expiry, listing, recovery.

One context = a compressed blob under `<id>.safetensors` and a JSON record under
`<id>.json`. The blob is written first and the record last (the commit point), so a
record always points at a complete object. The blob describes its record as well
(records.describe), so a lost record is rebuilt from it (`restore`): on a lookup that finds
no record, and for every blob without one by `restore_missing` (at start). A blob whose
described expiry has passed is purged instead, never revived.

A record owns the expiry: an expired context is purged (record first, then bytes) when it
is looked up and by `purge_expired`. A record that does not parse is skipped and logged,
never a failure of every listing. Every change of one context (commit, update, restore,
purge) holds that context's lock, so none lands between the read and the write of another
(a PATCH racing a DELETE never leaves a READY record without its blob).

The embedded service keeps its records here; distributed workers write READY records here
too, with no expiry (`owns_expiry=False`: in that mode the Redis record owns it), so that
any worker reads what another one wrote. (No torch here.)

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
from service.errors import (
    ContextLostError,
    ContextNotFoundError,
    CorruptContextError,
    StorageFullError,
)
from service.metadata import header_length, read_metadata
from service.serving.keyed_locks import KeyedLocks
from service.serving.quota import Usage, usage_of
from service.serving.records import (
    BLOB_SUFFIX,
    FAILED,
    PROCESSING,
    READY,
    ContextRecord,
    blob_key,
    described_record,
    is_blob_key,
    record_key,
)
from service.serving.validation import CheckedCreate
from storage import DiskTier, MemoryTier, PendingRead, TieredStore, TierFullError

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
EVICTED = "evicted from the disk tier to keep it within its capacity"
RESTORE_LIMIT = 100_000
"""The most records one `restore_missing` pass rebuilds (a bound on the start-up scan)."""
Change = Callable[[ContextRecord], ContextRecord | None]


class ContextRegistry:
    """Stored contexts in one store (see the module docstring)."""

    def __init__(self, store: TieredStore, *, owns_expiry: bool = True) -> None:
        self.store = store
        for tier in store.tiers:  # their counters and sizes in the metrics
            telemetry.track_tier(tier.name, tier)
        self.owns_expiry = owns_expiry
        self.locks = KeyedLocks()
        self.on_purge: list[Callable[[str], None]] = []  # e.g. drop the device-resident copy
        self.on_lost: list[Callable[[str, ContextLostError], Awaitable[object]]] = []
        for tier in store.tiers:
            if isinstance(tier, DiskTier):
                tier.on_evict.append(self._evicted)

    async def record(self, cid: str, tenant: str) -> ContextRecord | None:
        """The stored record if `tenant` may see it (rebuilt from its blob when only the blob
        is left); an expired one is purged on sight."""
        record = await self._read(cid) or await self.restore(cid)
        if record is None or not record.visible_to(tenant):
            return None
        if self._expired(record):
            await self.purge(cid)
            return None
        return record

    async def ready(self, cid: str) -> ContextRecord | None:
        """The record of a context whose blob is stored too (an earlier ingest finished)."""
        record = await self._read(cid)
        if record is None or record.state != READY:
            return None
        return record if await self.store.exists(blob_key(cid)) else None

    async def open_blob(self, cid: str) -> PendingRead | None:
        """The stored object the fast way (see TieredStore.open_view): the memory tier's
        bytes, else a read-only memory map of the disk tier's file handed out while its
        checksum runs, else through Redis; None when no tier holds it."""
        return await self.store.open_view(blob_key(cid))

    async def commit(self, record: ContextRecord, blob: bytes, ttl_s: float | None = None) -> None:
        """Store the blob, then the record (the commit point), both expiring from the tiers
        after `ttl_s` (None: when the record is purged). StorageFullError when the disk
        tier cannot hold the blob."""
        async with self.locks.hold(record.id):
            await self._store(blob_key(record.id), blob, ttl_s)
            await self._store(record_key(record.id), self._stored(record).to_json(), ttl_s)

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
            if not self.owns_expiry:  # a worker's copy: the Redis record says FAILED
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
        await self._store(record_key(record.id), self._stored(record).to_json())

    def _stored(self, record: ContextRecord) -> ContextRecord:
        """The record as this registry keeps it (no expiry where Redis owns it)."""
        return record if self.owns_expiry else replace(record, expire_time=None)

    async def update(self, cid: str, tenant: str, change: Change) -> ContextRecord | None:
        """The live record `tenant` sees after `change` (which returns None to leave it as
        it is), read and written under the context's lock; None when there is none."""
        async with self.locks.hold(cid):
            record = await self._read(cid)
            if record is None or not record.visible_to(tenant) or self._expired(record):
                return None
            if (changed := change(record)) is None:
                return record
            await self.put(changed)
            return changed

    async def extend(self, record: ContextRecord, ttl_s: float) -> ContextRecord | None:
        """Keep a stored context alive at least `ttl_s` more seconds (registered again);
        None when it went meanwhile."""

        def later(current: ContextRecord) -> ContextRecord | None:
            expire = extended_expiry(current.expire_time, ttl_s)
            return None if expire is None else replace(current, expire_time=expire)

        return await self.update(record.id, record.tenant, later)

    async def purge(self, cid: str) -> None:
        """Remove a context: the record first (invisible), then the bytes."""
        async with self.locks.hold(cid):
            await self._purge(cid)

    async def _purge(self, cid: str) -> None:
        await self.store.delete(record_key(cid))
        await self.store.delete(blob_key(cid))
        for hook in self.on_purge:
            hook(cid)

    async def forget(self, cid: str) -> None:
        """Drop this process's in-memory copies of a context that another process purged."""
        for tier in self.store.tiers:
            if isinstance(tier, MemoryTier):
                await tier.delete(blob_key(cid))
                await tier.delete(record_key(cid))
        for hook in self.on_purge:
            hook(cid)

    def keep_no_bytes_in_memory(self) -> None:
        """Store nothing in the memory tier: for an engine on the CPU, whose decoded contexts
        already live in host memory (the resident LRU), so that `memory_cache_bytes` is
        spent once, not twice; re-reads come from the disk file through the page cache."""
        for tier in self.store.tiers:
            if isinstance(tier, MemoryTier):
                tier.capacity_bytes = 0

    # -- recovery: records rebuilt from the blobs that describe them ------------------------

    async def restore(self, cid: str) -> ContextRecord | None:
        """Rebuild the lost record of a stored blob from the blob's description; None when
        there is no such blob (or it describes no record). An expired one is purged."""
        async with self.locks.hold(cid):
            if (record := await self._read(cid)) is not None:
                return record  # restored (or committed) while this waited
            if (record := await self.described(cid)) is None:
                return None
            if self._expired(record):
                log.info("context %s expired while its record was missing; purged", cid)
                await self._purge(cid)
                return None
            await self.put(record)
        log.warning("context %s: record rebuilt from its stored object", cid)
        return record

    async def restore_missing(self, limit: int = RESTORE_LIMIT) -> int:
        """Rebuild the record of every blob of the durable tier that has none (at most
        `limit` of them); how many were rebuilt."""
        keys = set(await self.store.durable.keys("ctx_"))
        orphans = [cid for cid in _blob_ids(keys) if record_key(cid) not in keys]
        restored = 0
        for cid in orphans[:limit]:
            restored += await self.restore(cid) is not None
        return restored

    async def stored_ids(self) -> list[str]:
        """The ids of every blob of the durable tier (sorted)."""
        return _blob_ids(set(await self.store.durable.keys("ctx_")))

    async def described(self, cid: str) -> ContextRecord | None:
        """The record the stored blob describes (read from its header on the durable tier,
        with its expiry as the blob was written); None without a blob or a description."""
        head = await self._head(blob_key(cid))
        if head is None:
            return None
        data, size = head
        try:
            return described_record(cid, read_metadata(data), size)
        except CorruptContextError as exc:
            log.error("the stored object of %s does not parse (%s); not restored", cid, exc)
            return None

    async def _head(self, key: str) -> tuple[bytes, int] | None:
        """The blob's safetensors header and its size (the whole blob off a non-disk tier)."""
        durable = self.store.durable
        if not isinstance(durable, DiskTier):
            data = await durable.get(key)
            return None if data is None else (data, len(data))
        first = await durable.head(key, 8)
        if first is None:
            return None
        try:
            return await durable.head(key, header_length(first[0]))
        except CorruptContextError:
            return first  # read_metadata says what is wrong with it

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
            if record is not None and self._expired(record):
                await self.purge(cid)
                purged += 1
        return purged

    def _expired(self, record: ContextRecord) -> bool:
        return self.owns_expiry and record.expired()

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


def _blob_ids(keys: set[str]) -> list[str]:
    return sorted(k.removesuffix(BLOB_SUFFIX) for k in keys if k.endswith(BLOB_SUFFIX))


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
