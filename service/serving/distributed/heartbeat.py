"""Worker heartbeats: who is alive, which model (identity) they serve, and for query routing
(distributed.affinity) the contexts each holds resident and its free query slots.

Each worker SETs `{p}worker:<name>` (a JSON `WorkerBeat`) with a TTL of `heartbeat_ttl_s`
every third of that, and adds its name to the set `{p}workers`. A worker whose key expired
is dead; readers drop it from the set. The API is ready only while at least one beats, and
it takes the model identity (fingerprints) that context ids hash from the beats.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field, fields

from redis.asyncio import Redis

from service.serving.distributed.keys import RedisKeys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerBeat:
    """What a worker says about itself on every beat."""

    name: str
    identity: dict[str, str]  # model, model_fingerprint, tokenizer_fingerprint, format_version
    device: str = "cpu"
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)
    beat_at: float = 0.0
    jobs_done: int = 0
    current: str | None = None  # the job entry it works on
    # query slots its own stream may fill (distributed.affinity): max queries minus those
    # running from other streams; 0 while it stops
    own_slots: int = 0
    resident: list[str] = field(default_factory=list)  # context ids on its device, MRU first

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes | str) -> WorkerBeat:
        """Fields this version does not know (a newer worker's) are ignored."""
        body = json.loads(data)
        known = {f.name for f in fields(WorkerBeat)}
        return WorkerBeat(**{k: v for k, v in body.items() if k in known})


def default_worker_name(device: str) -> str:
    """The host name (plus the device when it names one GPU): stable across restarts, so a
    restarted worker finds its own pending jobs."""
    host = socket.gethostname() or "worker"
    return f"{host}-{device.replace(':', '')}" if ":" in device else host


class Heartbeats:
    def __init__(self, client: Redis, keys: RedisKeys, ttl_s: float) -> None:
        self.client = client
        self.keys = keys
        self.ttl_ms = max(1, int(ttl_s * 1000))

    async def beat(self, beat: WorkerBeat) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.heartbeat(beat.name), beat.to_json(), px=self.ttl_ms)
            pipe.sadd(self.keys.workers, beat.name)
            await pipe.execute()

    async def remove(self, name: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.heartbeat(name))
            pipe.srem(self.keys.workers, name)
            await pipe.execute()

    async def alive(self, name: str) -> bool:
        """Whether the heartbeat of worker `name` has not expired."""
        return bool(await self.client.exists(self.keys.heartbeat(name)))

    async def live(self) -> list[WorkerBeat]:
        """Every worker whose heartbeat has not expired, by name."""
        members = await self.client.smembers(self.keys.workers)
        names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        if not names:
            return []
        raws = await self.client.mget([self.keys.heartbeat(n) for n in names])
        dead = [n for n, raw in zip(names, raws, strict=True) if raw is None]
        if dead:
            await self.client.srem(self.keys.workers, *dead)
        beats = []
        for name, raw in zip(names, raws, strict=True):
            try:
                if raw is not None:
                    beats.append(WorkerBeat.from_json(raw))
            except (ValueError, TypeError, AttributeError) as exc:  # never kill the monitor
                log.warning("heartbeat of worker %s does not parse (%s); ignored", name, exc)
        return beats
