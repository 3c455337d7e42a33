"""The job streams and their consumer group (Redis Streams), and the per-request replies.

Delivery is at least once. A worker:
1. after a (re)start reads its own pending entries first (XREADGROUP ... 0): the jobs it had
   taken and not acknowledged when it stopped;
2. then new entries (XREADGROUP ... >): its own query stream (`{p}jobs:direct:<name>`, the
   queries routed to it for context affinity, see distributed.affinity) first, then the
   shared streams, query jobs before ingest jobs;
3. every so often takes over entries idle longer than a bound (XAUTOCLAIM, every stream,
   the other workers' own ones too): the jobs of a worker that died. A live worker keeps
   its running job fresh (`keep_alive`, XCLAIM JUSTID, which resets the idle time without
   counting a delivery), so only the jobs of dead or hung workers move; entries another
   worker never read are taken with `take_unread`;
4. acknowledges (XACK + XDEL) only once the result is durable; an entry delivered more than
   `max_deliveries` times goes to the dead-letter stream instead (`dead_letter`).
Entries are deleted once acknowledged, so XLEN of a job stream is its backlog. The worker
side counts what it claims, acknowledges and dead-letters (service.telemetry, by kind).

An ingest job's document (up to the API's body limit) is not in its entry: it is a key of
its own (`{p}doc:<token>`, expiring with the context), which the entry names and which goes
when the entry is acknowledged or dead-lettered. So the streams stay small whatever the
documents, the dead letters (capped by count) never hold documents, and the documents
Redis holds at once are those of the admitted backlog (the API refuses past it). Trimming
the job streams by length instead (XADD MAXLEN) would drop entries still pending.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service import telemetry
from service.serving.distributed.jobs import (
    INGEST,
    KINDS,
    QUERY,
    IngestJob,
    Job,
    Reply,
    decode_job,
    encode_job,
)
from service.serving.distributed.keys import GROUP, RedisKeys

DEAD_LETTER_MAXLEN = 10_000
_DOC = "doc"  # the field of an ingest entry that names its document's key


@dataclass(frozen=True)
class Delivery:
    """One job entry handed to this consumer, with how often it has been delivered."""

    stream: str
    entry_id: str
    fields: Mapping[bytes, bytes] | None  # None: the entry was deleted meanwhile
    deliveries: int

    def job(self) -> Job:
        return decode_job(self.fields or {})


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobQueue:
    """Submit jobs (API side); read, claim, keep alive, acknowledge them (worker side)."""

    def __init__(self, client: Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys
        self.streams = [keys.stream(kind) for kind in KINDS]

    async def ensure_group(self, consumer: str | None = None) -> None:
        """Create the consumer group on every job stream (from the start; idempotent), and
        on the own query stream of `consumer` (a worker)."""
        streams = self._streams(consumer) if consumer else self.streams
        for stream in streams:
            try:
                await self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        if consumer:
            await self.client.sadd(self.keys.direct_workers, consumer)

    async def submit(self, job: Job, ttl_s: float | None = None) -> str:
        """Add the job to its stream; an ingest job's document goes under a key of its own
        that expires after `ttl_s` (its context's lifetime). The entry id."""
        if not isinstance(job, IngestJob):
            entry_id = await self.client.xadd(self.keys.stream(job.kind), encode_job(job))  # type: ignore[arg-type]
            return _text(entry_id)
        doc = self.keys.document(uuid.uuid4().hex)
        fields = {**encode_job(replace(job, text="")), _DOC: doc}
        px = None if ttl_s is None else max(1000, int(ttl_s * 1000))
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(doc, job.text.encode(), px=px)
            pipe.xadd(self.keys.stream(job.kind), fields)  # type: ignore[arg-type]
            _, entry_id = await pipe.execute()
        return _text(entry_id)

    async def submit_to(self, job: Job, worker: str, below: int) -> str | None:
        """Add the job to `worker`'s own stream if that holds fewer than `below` entries
        (one script: concurrent submissions never overfill it); its entry id, else None."""
        fields = [part for item in encode_job(job).items() for part in item]
        keys = (self.keys.direct(worker), self.keys.direct_workers)
        entry_id = await self.client.eval(_SUBMIT_BELOW, 2, *keys, below, worker, *fields)
        return None if entry_id is None else _text(entry_id)

    async def document(self, delivery: Delivery, job: IngestJob) -> IngestJob | None:
        """`job` with its document read back; None when the document's key is gone."""
        key = (delivery.fields or {}).get(_DOC.encode())
        if key is None:
            return job  # an entry written before documents had keys of their own
        raw = await self.client.get(_text(key))
        return None if raw is None else replace(job, text=_text(raw))

    async def backlog(self, kind: str) -> int:
        """Jobs of `kind` submitted and not yet acknowledged."""
        return int(await self.client.xlen(self.keys.stream(kind)))

    # -- worker side -------------------------------------------------------------------------

    def _streams(self, consumer: str) -> list[str]:
        """The streams `consumer` reads, in order: its own, then the shared ones."""
        return [self.keys.direct(consumer), *self.streams]

    def kind_of(self, stream: str) -> str:
        return INGEST if stream == self.keys.stream(INGEST) else QUERY

    def _claimed(self, found: list[Delivery]) -> list[Delivery]:
        for delivery in found:
            telemetry.JOBS_CLAIMED.labels(self.kind_of(delivery.stream)).inc()
        return found

    async def read_own_pending(self, consumer: str, count: int = 1000) -> list[Delivery]:
        """The entries this consumer took and never acknowledged (after a restart)."""
        found: list[Delivery] = []
        for stream in self._streams(consumer):
            reply = await self.client.xreadgroup(GROUP, consumer, {stream: "0"}, count=count)
            entries = _entries(reply)
            if entries:
                counts = await self._delivery_counts(stream, consumer)
                found += [Delivery(stream, i, f, counts.get(i, 1)) for i, f in entries]
        return self._claimed(found)

    async def read_new(
        self, consumer: str, block_ms: int, free: Mapping[str, int] | None = None
    ) -> list[Delivery]:
        """New entries, at most `free[kind]` of each kind (default one): the own stream's
        first, then the shared ones (queries first). When there are none, waits up to
        `block_ms` for the first (if the own and the shared query stream fill at the same
        instant, that wait may bring one query beyond `free`)."""
        left = dict(free or dict.fromkeys(KINDS, 1))
        found = await self._read_each(consumer, left)
        streams = [s for s in self._streams(consumer) if left.get(self.kind_of(s), 0) > 0]
        if not found and streams:
            found = _deliveries(
                await self.client.xreadgroup(
                    GROUP, consumer, dict.fromkeys(streams, ">"), count=1, block=block_ms
                )
            )
            for delivery in found:
                left[self.kind_of(delivery.stream)] -= 1
            if found:  # top up, without waiting, to the free slots
                found += await self._read_each(consumer, left)
        order = {s: i for i, s in enumerate(self._streams(consumer))}
        return self._claimed(sorted(found, key=lambda d: order[d.stream]))

    async def _read_each(self, consumer: str, left: dict[str, int]) -> list[Delivery]:
        """Without waiting, from each stream in order, as many as `left` of its kind."""
        found: list[Delivery] = []
        for stream in self._streams(consumer):
            kind = self.kind_of(stream)
            if left.get(kind, 0) > 0:
                got = _deliveries(
                    await self.client.xreadgroup(GROUP, consumer, {stream: ">"}, count=left[kind])
                )
                left[kind] -= len(got)
                found += got
        return found

    async def owns(self, delivery: Delivery, consumer: str) -> bool:
        """Whether `consumer` still holds the entry (another worker may have claimed it)."""
        rows = await self.client.xpending_range(
            delivery.stream, GROUP, delivery.entry_id, delivery.entry_id, 1
        )
        return bool(rows) and _text(rows[0]["consumer"]) == consumer

    async def claim_idle(self, consumer: str, min_idle_ms: int, count: int = 16) -> list[Delivery]:
        """Take over entries idle for at least `min_idle_ms` (their worker died or hung),
        from the shared streams and every worker's own stream."""
        direct = [self.keys.direct(w) for w in await self.direct_workers()]
        found: list[Delivery] = []
        for stream in [*self.streams, *direct]:
            try:
                reply = await self.client.xautoclaim(
                    stream, GROUP, consumer, min_idle_ms, start_id="0-0", count=count
                )
            except ResponseError as exc:  # a worker's stream removed meanwhile
                if stream in self.streams or "NOGROUP" not in str(exc):
                    raise
                continue
            rows: list[Any] = list(reply)
            claimed = [(_text(i), f) for i, f in rows[1]]
            gone = [_text(i) for i in (rows[2] if len(rows) > 2 else [])]
            if gone:  # deleted entries still pending: nothing left to do for them
                await self.client.xack(stream, GROUP, *gone)
            if claimed:
                counts = await self._delivery_counts(stream, consumer)
                found += [Delivery(stream, i, f, counts.get(i, 1)) for i, f in claimed]
        return self._claimed(found)

    async def direct_workers(self) -> list[str]:
        """The workers that have an own query stream."""
        return sorted(_text(m) for m in await self.client.smembers(self.keys.direct_workers))

    async def take_unread(
        self, consumer: str, worker: str, before_ms: int, count: int
    ) -> list[Delivery]:
        """At most `count` entries of `worker`'s own stream that nobody has read and that
        were added before `before_ms` (unix ms): the worker died, or never got to them."""
        stream = self.keys.direct(worker)
        try:
            groups = await self.client.xinfo_groups(stream)
        except ResponseError:  # no such stream
            return []
        last = next(
            (_text(g["last-delivered-id"]) for g in groups if _text(g["name"]) == GROUP), None
        )
        if last is None:  # made by an XADD after it was removed: read it from the start
            await self.ensure_group_on(stream)
            last = "0-0"
        stale = await self.client.xrange(stream, f"({last}", str(before_ms), count=count)
        if not stale:
            return []
        reply = await self.client.xreadgroup(GROUP, consumer, {stream: ">"}, count=len(stale))
        return self._claimed(_deliveries(reply))

    async def ensure_group_on(self, stream: str) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: made meanwhile
            await self.client.xgroup_create(stream, GROUP, id="0")

    async def drop_direct(self, worker: str) -> bool:
        """Remove `worker`'s own stream if it holds nothing (the worker is gone)."""
        dropped = await self.client.eval(
            _DROP_IF_EMPTY, 2, self.keys.direct(worker), self.keys.direct_workers, worker
        )
        return bool(dropped)

    async def keep_alive(self, delivery: Delivery, consumer: str) -> bool:
        """Reset the entry's idle time so that no other worker claims it while it runs;
        False (and nothing changed) when another worker holds it already."""
        kept = await self.client.eval(
            _KEEP_ALIVE, 1, delivery.stream, GROUP, delivery.entry_id, consumer
        )
        return bool(kept)

    async def ack(self, delivery: Delivery) -> None:
        """Done for good: acknowledge and delete the entry (and its document)."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(delivery.stream, GROUP, delivery.entry_id)
            pipe.xdel(delivery.stream, delivery.entry_id)
            if (doc := (delivery.fields or {}).get(_DOC.encode())) is not None:
                pipe.unlink(_text(doc))
            await pipe.execute()
        telemetry.JOBS_COMPLETED.labels(self.kind_of(delivery.stream)).inc()

    async def dead_letter(self, delivery: Delivery, reason: str, consumer: str) -> None:
        """Move the entry to the dead-letter stream (with why), then acknowledge it."""
        fields: dict[str, bytes | str] = {_text(k): v for k, v in (delivery.fields or {}).items()}
        fields |= {
            "reason": reason,
            "stream": delivery.stream,
            "entry_id": delivery.entry_id,
            "deliveries": str(delivery.deliveries),
            "consumer": consumer,
            "at": repr(time.time()),
        }
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.keys.dead_letter,
                fields,  # type: ignore[arg-type]
                maxlen=DEAD_LETTER_MAXLEN,
                approximate=True,
            )
            pipe.xack(delivery.stream, GROUP, delivery.entry_id)
            pipe.xdel(delivery.stream, delivery.entry_id)
            if (doc := (delivery.fields or {}).get(_DOC.encode())) is not None:
                pipe.unlink(_text(doc))
            await pipe.execute()
        telemetry.JOBS_DEAD_LETTERED.labels(self.kind_of(delivery.stream)).inc()

    async def _delivery_counts(self, stream: str, consumer: str) -> dict[str, int]:
        rows = await self.client.xpending_range(stream, GROUP, "-", "+", 10_000, consumer)
        return {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}


def _deliveries(reply: Any) -> list[Delivery]:
    return [
        Delivery(_text(stream), _text(i), f or None, 1)
        for stream, items in reply or []
        for i, f in items
    ]


_SUBMIT_BELOW = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
redis.call('SADD', KEYS[2], ARGV[2])
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
"""

_DROP_IF_EMPTY = """
if redis.call('XLEN', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

_KEEP_ALIVE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""


def _entries(reply: Any) -> list[tuple[str, Mapping[bytes, bytes] | None]]:
    return [(_text(i), f or None) for _, items in reply or [] for i, f in items]


# -- replies ---------------------------------------------------------------------------------


class ReplyWriter:
    """The worker's end of one request's reply stream (which expires after `ttl_s`)."""

    def __init__(self, client: Redis, key: str, attempt: str, ttl_s: float) -> None:
        self.client, self.key, self.attempt = client, key, attempt
        self.ttl_ms = max(1000, int(ttl_s * 1000))

    async def send(self, reply: Reply) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xadd(self.key, reply.encode())  # type: ignore[arg-type]
            pipe.pexpire(self.key, self.ttl_ms)
            await pipe.execute()


class ReplyReader:
    """The API's end: the replies of one request, in order, waiting `block_ms` at a time."""

    def __init__(self, client: Redis, key: str) -> None:
        self.client, self.key = client, key
        self._last = "0-0"

    async def read(self, block_ms: int) -> list[Reply]:
        reply = await self.client.xread({self.key: self._last}, count=256, block=block_ms)
        events = []
        for entry_id, fields in _entries(reply):
            self._last = entry_id
            if fields is not None:
                events.append(Reply.decode(fields))
        return events
