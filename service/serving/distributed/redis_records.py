"""Context records in Redis, and the content-hash id the API gives a new document.

A record is one JSON value under `{p}ctx:<id>`: the `service.serving.records.ContextRecord` the API
shows, plus which tiers hold the bytes, the failure (a domain error's payload) and the
worker that finished it. The record key expires with the context (PX = time to its
expire_time), so an expired context is a 404 the moment it expires; `{p}expiry` remembers
when each context's bytes may be purged, and a worker's sweep removes them from the tiers.

State changes are optimistic transactions (WATCH / MULTI): PROCESSING -> READY | FAILED
happens at most once per registration, however many workers finish the same job, and each
transition is appended to the `{p}events` stream in the same transaction. A READY record
that Redis lost comes back through `restore` (from the object that describes it, by a
worker: service.serving.distributed.housekeeping), unless the context was deleted or
expired meanwhile. Every purge is published on `{p}purges` (workers drop their copies).

Ids: service.serving.ids.context_id, the same in every mode (the model identity comes from
the workers' heartbeats).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from service.errors import ContextNotFoundError, InvalidInputError
from service.serving.distributed.keys import RedisKeys
from service.serving.distributed.remote_record import (
    RemoteRecord,
    as_text,
    expires_at,
    px,
)
from service.serving.quota import Usage, usage_of
from service.serving.records import (
    ContextRecord,
    decode_page_token,
    encode_page_token,
    listing_order,
)
from service.types import ANY_TENANT, ContextInfo, ContextPage

PROCESSING, READY, FAILED = "PROCESSING", "READY", "FAILED"
RESTORED = "RESTORED"  # the event of a record rebuilt from its stored object
EVENTS_MAXLEN = 100_000
_USAGE_BATCH = 1000  # records read per MGET when counting a tenant's usage


Change = Callable[[RemoteRecord], RemoteRecord | None]


class RecordStore:
    """Context records in Redis; every change is a WATCH/MULTI transaction."""

    def __init__(self, client: Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys

    async def get(self, context_id: str) -> RemoteRecord | None:
        raw = await self.client.get(self.keys.context(context_id))
        return None if raw is None else RemoteRecord.from_json(raw)

    async def create(
        self, new: RemoteRecord, admit: Callable[[Usage], None] | None = None
    ) -> tuple[RemoteRecord, bool]:
        """Store `new` unless a live record exists (then return it, False). A FAILED record
        is replaced: registering a failed document again retries it. `admit` is shown the
        tenant's usage first and may refuse (raise); the count and the creation are one
        transaction (the tenant's index is watched), so concurrent registrations on any
        number of API processes never take a tenant past its quota of contexts."""
        key = self.keys.context(new.id)
        index = self.keys.index(new.record.tenant)
        while True:
            async with self.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key, index)
                    raw = await pipe.get(key)
                    if raw is not None:
                        old = RemoteRecord.from_json(raw)
                        if old.state != FAILED:
                            return old, False
                    if admit is not None:
                        admit(await self._usage(pipe, new.record.tenant, new.id))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    self._store(pipe, new)
                    await pipe.execute()
                    return new, True
                except WatchError:
                    continue

    async def _usage(self, client: Any, tenant: str, new_id: str) -> Usage:
        """What `tenant` holds now (its live records, other than `new_id`), read through
        `client` (a pipeline in its watching phase)."""
        ids = [as_text(i) for i in await client.zrange(self.keys.index(tenant), 0, -1)]
        ids = [i for i in ids if i != new_id]
        records = []
        for start in range(0, len(ids), _USAGE_BATCH):
            batch = ids[start : start + _USAGE_BATCH]
            raws = await client.mget([self.keys.context(i) for i in batch])
            records += [RemoteRecord.from_json(r).record for r in raws if r is not None]
        return usage_of(r for r in records if r.tenant == tenant)

    def _store(self, pipe: Any, new: RemoteRecord) -> None:
        """Queue the writes of a new record: the record, its places in the listings and in
        the expiry set."""
        pipe.set(self.keys.context(new.id), new.to_json(), px=px(new.record))
        created = datetime.fromisoformat(new.record.create_time).timestamp()
        pipe.zadd(self.keys.index(new.record.tenant), {new.id: created})
        pipe.zadd(self.keys.index_all, {new.id: created})
        pipe.zadd(self.keys.expiry, {new.id: expires_at(new.record)})

    async def restore(self, record: ContextRecord, tiers: tuple[str, ...], worker: str) -> bool:
        """Store the READY `record` of a context whose record Redis lost (rebuilt from its
        stored object); False when a record exists, or when its purge is due (deleted or
        expired: the sweep removes its bytes) or it expired."""
        key = self.keys.context(record.id)
        while True:
            async with self.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    purge_at = await pipe.zscore(self.keys.expiry, record.id)
                    gone = purge_at is not None and purge_at <= time.time()
                    if record.expired() or gone or await pipe.exists(key):
                        return False
                    pipe.multi()  # type: ignore[no-untyped-call]
                    self._store(
                        pipe, RemoteRecord(replace(record, state=READY), tiers, None, worker)
                    )
                    fields = {"event": RESTORED, "id": record.id, "worker": worker}
                    pipe.xadd(self.keys.events, fields, maxlen=EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    async def update(self, context_id: str, change: Change, event: str | None = None) -> bool:
        """Apply `change` to the record atomically; False when there is no record or
        `change` returns None (nothing to do). `event` is appended to the events stream."""
        key = self.keys.context(context_id)
        while True:
            async with self.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        return False
                    old = RemoteRecord.from_json(raw)
                    new = change(old)
                    if new is None:
                        return False
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if new.record.expire_time == old.record.expire_time:
                        pipe.set(key, new.to_json(), keepttl=True)
                    else:
                        pipe.set(key, new.to_json(), px=px(new.record))
                        pipe.zadd(self.keys.expiry, {context_id: expires_at(new.record)})
                    if event is not None:
                        fields = {"event": event, "id": context_id, "worker": new.worker or ""}
                        pipe.xadd(
                            self.keys.events,
                            fields,  # type: ignore[arg-type]
                            maxlen=EVENTS_MAXLEN,
                            approximate=True,
                        )
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    async def mark_ready(
        self, context_id: str, ready: ContextRecord, tiers: tuple[str, ...], worker: str
    ) -> bool:
        """PROCESSING -> READY with the stored object's stats; False if it was not PROCESSING."""

        def change(old: RemoteRecord) -> RemoteRecord | None:
            if old.state != PROCESSING:
                return None
            record = replace(
                ready,
                display_name=old.record.display_name,
                create_time=old.record.create_time,
                expire_time=old.record.expire_time,
                tenant=old.record.tenant,
                state=READY,
                progress=1.0,
                error=None,
            )
            return RemoteRecord(record, tiers, None, worker)

        return await self.update(context_id, change, event=READY)

    async def mark_failed(
        self,
        context_id: str,
        failure: dict[str, Any],
        worker: str,
        from_state: str = PROCESSING,
    ) -> bool:
        """`from_state` -> FAILED with the reason; False if the record was in another state."""

        def change(old: RemoteRecord) -> RemoteRecord | None:
            if old.state != from_state:
                return None
            record = replace(old.record, state=FAILED, error=str(failure.get("message")))
            return replace(old, record=record, failure=failure, worker=worker)

        return await self.update(context_id, change, event=FAILED)

    async def set_progress(self, context_id: str, progress: float) -> bool:
        def change(old: RemoteRecord) -> RemoteRecord | None:
            if old.state != PROCESSING or old.record.progress >= progress:
                return None
            return replace(old, record=replace(old.record, progress=progress))

        return await self.update(context_id, change)

    async def set_expiry(self, context_id: str, expire_time: datetime, tenant: str) -> bool:
        def change(old: RemoteRecord) -> RemoteRecord | None:
            if not old.record.visible_to(tenant):
                return None
            return replace(old, record=replace(old.record, expire_time=expire_time.isoformat()))

        return await self.update(context_id, change)

    async def delete(self, record: RemoteRecord) -> None:
        """Remove the record now, and tell the workers to drop their in-memory copies; the
        bytes are purged from the shared tiers by the next sweep."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.context(record.id))
            pipe.zrem(self.keys.index(record.record.tenant), record.id)
            pipe.zrem(self.keys.index_all, record.id)
            pipe.zadd(self.keys.expiry, {record.id: 0})
            pipe.publish(self.keys.purges, record.id)
            await pipe.execute()

    async def schedule_purge(self, context_id: str) -> None:
        """Let the next sweep purge this context's bytes (its record is gone)."""
        await self.client.zadd(self.keys.expiry, {context_id: 0})

    # -- listing ---------------------------------------------------------------------------

    async def page(self, tenant: str, page_size: int, page_token: str | None) -> ContextPage:
        """The tenant's contexts (every tenant's for ANY_TENANT), oldest first, one page."""
        if page_size < 1:
            raise InvalidInputError(f"page_size must be >= 1. Given: {page_size}")
        index = self.keys.index_all if tenant == ANY_TENANT else self.keys.index(tenant)
        after = decode_page_token(page_token) if page_token else (-math.inf, "")
        found: list[ContextInfo] = []
        start = 0
        batch = max(page_size + 1, 64)
        while len(found) <= page_size:
            rows = await self.client.zrangebyscore(
                index, after[0], "+inf", start=start, num=batch, withscores=True
            )
            if not rows:
                break
            infos, removed = await self._visible(index, rows, tenant, after)
            found += infos
            start += len(rows) - removed
        found.sort(key=listing_order)
        page = found[:page_size]
        more = len(found) > page_size
        return ContextPage(page, encode_page_token(listing_order(page[-1])) if more else None)

    async def _visible(
        self, index: str, rows: list[Any], tenant: str, after: tuple[float, str]
    ) -> tuple[list[ContextInfo], int]:
        """The rows' contexts the tenant sees after `after`, and how many expired rows were
        dropped from the index."""
        ids = [as_text(row[0]) for row in rows]
        raws = await self.client.mget([self.keys.context(cid) for cid in ids])
        infos, gone = [], []
        for cid, raw in zip(ids, raws, strict=True):
            if raw is None:
                gone.append(cid)  # expired: its record key is gone
                continue
            record = RemoteRecord.from_json(raw).record
            info = record.info()
            if record.visible_to(tenant) and listing_order(info) > after:
                infos.append(info)
        if gone:
            await self.client.zrem(index, *gone)
        return infos, len(gone)

    # -- expiry sweep ----------------------------------------------------------------------

    async def due(self, now: float, limit: int = 100) -> list[str]:
        """Ids whose bytes may be purged (expired or deleted), oldest expiry first."""
        rows = await self.client.zrangebyscore(self.keys.expiry, "-inf", now, start=0, num=limit)
        return [as_text(row) for row in rows]

    async def claim_purge(self, context_id: str, now: float) -> bool:
        """Take the purge of `context_id` (True for exactly one caller, while still due)."""
        claimed = await self.client.eval(_CLAIM_PURGE, 1, self.keys.expiry, context_id, repr(now))
        return bool(claimed)

    async def sweep(self, purge: Callable[[str], Awaitable[None]], max_batches: int = 100) -> int:
        """Purge (`purge(id)`, the bytes) every expired or deleted context whose purge this
        caller claims (each by one worker), 100 at a time until none is due (at most
        `max_batches` batches a call); how many."""
        now = time.time()
        purged = 0
        for _ in range(max_batches):
            due = await self.due(now)
            if not due:
                break
            for cid in due:
                purged += await self._sweep_one(cid, now, purge)
        return purged

    async def _sweep_one(
        self, cid: str, now: float, purge: Callable[[str], Awaitable[None]]
    ) -> int:
        """1 when this caller purged `cid`; 0 when it was extended (rescheduled) or another
        caller claimed it. Either way it leaves the due range."""
        current = await self.get(cid)
        if current is not None and not current.record.expired():
            await self.reschedule(current)
            return 0
        if not await self.claim_purge(cid, now):
            return 0
        if current is not None:
            await self.client.delete(self.keys.context(cid))
        await purge(cid)
        await self.client.publish(self.keys.purges, cid)  # every worker's memory
        return 1

    async def wait_settled(self, cid: str, timeout_s: float) -> RemoteRecord:
        """The record once it leaves PROCESSING, or as it is after `timeout_s`;
        ContextNotFoundError when it goes (deleted or expired) meanwhile."""
        deadline = time.monotonic() + timeout_s
        pause = 0.05
        while True:
            record = await self.get(cid)
            if record is None:
                raise ContextNotFoundError(cid)
            if record.state != PROCESSING or time.monotonic() >= deadline:
                return record
            await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
            pause = min(pause * 1.5, 0.5)

    async def reschedule(self, record: RemoteRecord) -> None:
        """The record outlives its entry in the expiry set (clock skew): put it right."""
        await self.client.zadd(self.keys.expiry, {record.id: expires_at(record.record)})


_CLAIM_PURGE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""
