"""Every Redis key of the distributed mode, under one prefix (`KVZIP_REDIS_PREFIX`).

{p}jobs:ingest, {p}jobs:query   job streams, consumer group "workers"
{p}jobs:dead                    dead-letter stream (jobs delivered too often)
{p}jobs:direct:<worker>         query jobs routed to the worker holding their context
{p}jobs:direct                  the workers that have such a stream (set)
{p}doc:<token>                  the document of one ingest job (expires with its context;
                                deleted when the job is acknowledged or dead-lettered)
{p}ctx:<id>                     a context record (JSON); expires with the context
{p}index, {p}index:<tenant>     listing order (sorted sets, score = create time)
{p}expiry                       when each context's bytes may be purged (sorted set)
{p}events                       READY / FAILED transitions (capped stream)
{p}workers, {p}worker:<name>    worker names; each worker's heartbeat (key with a TTL)
{p}reply:<request>              one query's answer, token by token (stream with a TTL)
{p}cancel:<request>             set when the asker went away (key with a TTL)
{p}rate:<name>:<key>            a token bucket of the API's rate limits (hash with a TTL)
{p}purges                       pub/sub: ids purged (DELETE, sweep); workers drop their copies
{p}restores                     pub/sub: {"id", "reply"} asks workers to rebuild a lost record
{p}restored:<request>           the workers' answers to one restore request (list with a TTL)
{p}blob:<key>:...               the Redis tier (storage.RedisTier), chunked blobs
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

GROUP = "workers"


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "kvzip:"

    def stream(self, kind: str) -> str:
        return f"{self.prefix}jobs:{kind}"

    def direct(self, worker: str) -> str:
        """The query stream of one worker (context affinity, see distributed.affinity)."""
        return f"{self.prefix}jobs:direct:{worker}"

    @property
    def direct_workers(self) -> str:
        return f"{self.prefix}jobs:direct"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}jobs:dead"

    def context(self, context_id: str) -> str:
        return f"{self.prefix}ctx:{context_id}"

    @property
    def index_all(self) -> str:
        return f"{self.prefix}index"

    def index(self, tenant: str) -> str:
        return f"{self.prefix}index:{hashlib.sha256(tenant.encode()).hexdigest()[:16]}"

    @property
    def expiry(self) -> str:
        return f"{self.prefix}expiry"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def workers(self) -> str:
        return f"{self.prefix}workers"

    def heartbeat(self, worker: str) -> str:
        return f"{self.prefix}worker:{worker}"

    def document(self, token: str) -> str:
        """The document of one ingest job (the job's entry holds this name, not the text)."""
        return f"{self.prefix}doc:{token}"

    def ingest_job(self, context_id: str) -> str:
        """The stream entry id of the ingest job submitted for a context."""
        return f"{self.prefix}ingest-job:{context_id}"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}reply:{request_id}"

    def cancel(self, request_id: str) -> str:
        return f"{self.prefix}cancel:{request_id}"

    def rate(self, name: str, key: str) -> str:
        """The token bucket of `key` (a key digest or a client address) in limiter `name`."""
        return f"{self.prefix}rate:{name}:{key}"

    @property
    def purges(self) -> str:
        return f"{self.prefix}purges"

    @property
    def restores(self) -> str:
        return f"{self.prefix}restores"

    def restored(self, request_id: str) -> str:
        return f"{self.prefix}restored:{request_id}"
