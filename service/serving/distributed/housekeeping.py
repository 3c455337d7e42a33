"""A worker's housekeeping: the expiry sweep, records rebuilt from the objects on the shared
disk, and purges told to every worker. (No torch here.)

- Sweep: every `sweep_interval_s`, the bytes of every expired or deleted context (each by
  one worker), then a note on `{p}purges`.
- Restore scan: at start, and again whenever Redis turns out to have lost its data (the job
  streams were gone), every object of the shared disk whose record Redis lacks gets its
  READY record back as its registration made it (tenant, times, expiry; the object
  describes it). Not a deleted context whose purge is pending, nor an expired one (its
  bytes are handed to the sweep instead). At most `scan_limit` objects per pass, beside the
  job loop (it never delays serving).
- Restore on a miss: an API that finds no record asks every worker (`request_restore`, on
  `{p}restores`); each answers "1" (the record is there now) or "0" on the reply list.
- Purges: on a note on `{p}purges` (a DELETE, a sweep) each worker drops its in-memory
  copies (memory tier, resident context). One that missed a note still never serves the
  context: a query checks the Redis record first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.serving.distributed.keys import RedisKeys
from service.serving.distributed.loops import every, sleep_or_stop
from service.serving.distributed.protocol import Executor
from service.serving.distributed.redis_records import RecordStore
from service.serving.distributed.remote_record import as_text
from service.serving.records import is_context_id
from service.serving.registry import RESTORE_LIMIT

log = logging.getLogger(__name__)

RESTORE_WAIT_S = 1.0
"""How long an API waits for the workers' answers to a restore request (under the client's
socket timeout)."""
REPLY_TTL_MS = 10_000
LISTEN_POLL_S = 0.25


async def request_restore(
    client: Redis, keys: RedisKeys, cid: str, wait_s: float = RESTORE_WAIT_S
) -> bool:
    """Ask the workers to rebuild the lost record of `cid` from its stored object; True once
    one says the record is there (within `wait_s`), False when none can."""
    if not is_context_id(cid):
        return False
    reply = keys.restored(uuid.uuid4().hex)
    listeners = await client.publish(keys.restores, json.dumps({"id": cid, "reply": reply}))
    deadline = time.monotonic() + wait_s
    try:
        for _ in range(listeners):
            remaining = deadline - time.monotonic()
            answer = await client.blpop([reply], timeout=remaining) if remaining > 0 else None
            if answer is None:
                return False
            if answer[1] == b"1":
                return True
        return False
    finally:
        with contextlib.suppress(RedisError, OSError):
            await client.unlink(reply)


class Housekeeping:
    """The sweep, the restore scan and the listener of one worker (see the docstring)."""

    def __init__(
        self,
        client: Redis,
        keys: RedisKeys,
        executor: Executor,
        name: str,
        sweep_interval_s: float = 60.0,
        scan_limit: int = RESTORE_LIMIT,
    ) -> None:
        self.client, self.keys, self.executor, self.name = client, keys, executor, name
        self.records = RecordStore(client, keys)
        self.sweep_interval_s, self.scan_limit = sweep_interval_s, scan_limit
        self._rescan = asyncio.Event()
        self._rescan.set()  # a first pass at start

    # -- the sweep -------------------------------------------------------------------------

    async def sweep_forever(self, done: asyncio.Event) -> None:
        await every(done, self.sweep_interval_s, self.sweep, f"worker {self.name}: expiry sweep")

    async def sweep(self) -> int:
        """Purge the bytes of every expired or deleted context (each by one worker)."""
        purged = await self.records.sweep(self.executor.purge)
        if purged:
            log.info("worker %s: purged %d expired or deleted contexts", self.name, purged)
        return purged

    # -- records rebuilt from stored objects -----------------------------------------------

    def rescan(self) -> None:
        """Redis lost its data: scan the shared disk again."""
        self._rescan.set()

    async def restore(self, cid: str) -> bool:
        """True when `cid` has a record now (it had one, or its stored object gave it one)."""
        if await self.records.get(cid) is not None:
            return True
        found = await self.executor.restore(cid)
        if found is None:
            return False
        record, tiers = found
        if record.expired():  # as registered: its bytes go the way of any expired context
            await self.records.schedule_purge(cid)
            return False
        if await self.records.restore(record, tiers, self.name):
            log.warning("worker %s: record of %s rebuilt from its stored object", self.name, cid)
        return await self.records.get(cid) is not None

    async def scan(self, done: asyncio.Event | None = None) -> int:
        """Rebuild every record Redis lacks of an object on the shared disk (at most
        `scan_limit`); how many contexts have a record after it."""
        restored = 0
        for cid in (await self.executor.stored_ids())[: self.scan_limit]:
            if done is not None and done.is_set():
                break
            restored += await self.restore(cid)
        return restored

    async def scan_forever(self, done: asyncio.Event) -> None:
        while not done.is_set():
            if self._rescan.is_set():
                self._rescan.clear()
                try:
                    log.info("worker %s: %d stored contexts have records", self.name,
                             await self.scan(done))  # fmt: skip
                except (RedisError, OSError) as exc:
                    log.warning("worker %s: restore scan failed (%s); again soon", self.name, exc)
                    self._rescan.set()
                except Exception:
                    log.exception("worker %s: restore scan failed", self.name)
            await sleep_or_stop(done, 1.0)

    # -- the listener ----------------------------------------------------------------------

    async def listen_forever(self, done: asyncio.Event) -> None:
        """Answer restore requests and purge notes until `done` (reconnecting on failure)."""
        while not done.is_set():
            try:
                await self._listen(done)
            except (RedisError, OSError) as exc:
                log.warning("worker %s: listener failed (%s); again in 1 s", self.name, exc)
                await sleep_or_stop(done, 1.0)

    async def _listen(self, done: asyncio.Event) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.keys.purges, self.keys.restores)
            while not done.is_set():
                message = await pubsub.get_message(timeout=LISTEN_POLL_S)
                if message is not None:
                    await self._handle(message)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def _handle(self, message: dict[str, Any]) -> None:
        channel, data = as_text(message["channel"]), as_text(message["data"])
        if channel == self.keys.purges:
            await self.executor.forget(data)
            return
        try:
            body = json.loads(data)
            cid, reply = str(body["id"]), str(body["reply"])
        except (ValueError, KeyError, TypeError):
            log.warning("worker %s: a restore request that does not parse: %.200r", self.name, data)
            return
        if not (is_context_id(cid) and reply.startswith(self.keys.restored(""))):
            return
        answer = b"1" if await self.restore(cid) else b"0"
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.rpush(reply, answer)
            pipe.pexpire(reply, REPLY_TTL_MS)
            await pipe.execute()
