"""Redis tier: each object split in parts of at most `part_bytes`, a manifest written last.

Keys (for a tier `prefix` and an object `key`)::

    {prefix}blob:{key}:part:{i}      i = 0 .. part_count-1, raw bytes
    {prefix}blob:{key}:manifest      JSON: format_version, part_count, sizes, part_sha256,
                                     total_bytes, sha256

A put writes every part (one pipeline), then SETs the manifest, so a reader never sees a
manifest before its parts. A read fetches the parts in parallel on a few connections of its
own (`storage.redis_fetch`), straight into one buffer (the returned bytes, or the caller's
with `get_into`), checking each part's sha256 as its bytes arrive. A read whose manifest is
missing is a miss; a read whose manifest does not parse, whose part is missing (evicted by
the server's allkeys-lru, or expired), of another size or failing its checksum is a miss
too, and the remnants are UNLINKed (counted in `evictions`), unless a writer replaced the
manifest meanwhile (checked with WATCH). Every key carries a TTL when one is given: the
shorter of the call's and `default_ttl_s` (so that `default_ttl_s` bounds how long any copy
stays in Redis).

Never hang: create the client with `socket_timeout` and `socket_connect_timeout`, and a small
`retry` (redis-py 8 retries 10 times by default, which turns "Redis is down" into several
seconds per call). `redis_client()` below builds such a client. Any Redis error becomes
`TierUnavailableError`, which `TieredStore` logs and skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage._checksum import PART_BYTES, sha256_all, split
from storage._ttl import check_ttl
from storage.base import TierUnavailableError, validate_key
from storage.buffers import new_bytes
from storage.redis_fetch import Endpoint, PartFetcher

FORMAT_VERSION = 1
DEFAULT_PART_BYTES = PART_BYTES
READ_WORKERS = 2
"""Connections (and threads) one read fetches parts on (see docs/benchmarks.md)."""
READ_WINDOW_BYTES = 4 * 1024 * 1024
"""Bytes asked for per GETRANGE."""
READ_DEPTH = 4
"""Windows in flight per connection (bounds what the server buffers for one read)."""

Allocate = Callable[[int], memoryview]
"""Given a size, a writable buffer of exactly that many bytes (see `RedisTier.get_into`)."""
_GLOB_SPECIAL = frozenset("*?[]\\")


def redacted_url(url: str) -> str:
    """A Redis URL without its password (for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def redis_client(url: str, *, timeout_s: float = 2.0, retries: int = 1) -> Redis:
    """A binary-safe client that fails within about `(retries + 1) * timeout_s` seconds."""
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        decode_responses=False,
    )


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a reader needs to reassemble and verify one object."""

    part_count: int
    sizes: list[int]
    part_sha256: list[str]
    total_bytes: int
    sha256: str
    format_version: int = FORMAT_VERSION

    @classmethod
    def of_parts(cls, parts: list[memoryview], data: bytes | memoryview) -> Manifest:
        """The manifest describing `data` split as `parts`."""
        return cls(
            part_count=len(parts),
            sizes=[len(p) for p in parts],
            part_sha256=sha256_all(parts),
            total_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )

    def encode(self) -> bytes:
        """Canonical JSON bytes."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Manifest | None:
        """The manifest in `raw`, or None when it does not parse or is of another version."""
        try:
            obj = json.loads(raw)
            manifest = cls(**obj) if isinstance(obj, dict) else None
        except (ValueError, TypeError):
            return None
        return manifest if manifest is not None and manifest._consistent() else None

    def _consistent(self) -> bool:
        return (
            self.format_version == FORMAT_VERSION
            and isinstance(self.part_count, int)
            and isinstance(self.sizes, list)
            and isinstance(self.part_sha256, list)
            and len(self.sizes) == len(self.part_sha256) == self.part_count
            and all(isinstance(s, int) and s >= 1 for s in self.sizes)
            and all(isinstance(d, str) for d in self.part_sha256)
            and sum(self.sizes) == self.total_bytes
            and isinstance(self.sha256, str)
        )


def _shorter(a: float | None, b: float | None) -> float | None:
    """The shorter of two lifetimes, None standing for "never expires"."""
    return b if a is None else a if b is None else min(a, b)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def _writable(buffer: memoryview, size: int) -> memoryview:
    """`buffer` as flat bytes, checked writable, contiguous and `size` bytes long."""
    view = memoryview(buffer)
    if view.readonly or not view.c_contiguous or view.nbytes != size:
        raise ValueError(f"allocate({size}) must return a writable contiguous {size}-byte buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _split(data: bytes, part_bytes: int) -> list[memoryview]:
    view = memoryview(data)
    return [view[i : i + part_bytes] for i in range(0, len(data), part_bytes)]


class RedisTier:
    """Bytes by key in Redis, chunked; see the module docstring for keys and guarantees.

    Counters (plain ints, for metrics): `hits`, `misses` (counted by `get` only), `evictions`
    (incomplete or corrupt objects found and removed: what the server's LRU left behind).
    """

    def __init__(
        self,
        client: Redis,
        prefix: str = "kvzip:",
        part_bytes: int = DEFAULT_PART_BYTES,
        default_ttl_s: float | None = None,
        name: str = "redis",
        *,
        read_workers: int = READ_WORKERS,
        read_window_bytes: int = READ_WINDOW_BYTES,
        read_depth: int = READ_DEPTH,
    ) -> None:
        if part_bytes < 1:
            raise ValueError(f"part_bytes must be >= 1, got {part_bytes}")
        kwargs: dict[str, Any] = client.get_connection_kwargs()  # type: ignore[no-untyped-call]
        if kwargs.get("decode_responses"):
            raise ValueError("RedisTier needs a client with decode_responses=False (binary)")
        self.name = name
        self.prefix = prefix
        self.part_bytes = part_bytes
        self.default_ttl_s = check_ttl(default_ttl_s)
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._client = client
        self._fetcher = PartFetcher(
            Endpoint.of_client(client), read_workers, read_window_bytes, read_depth
        )

    def close(self) -> None:
        """Close the tier's own read connections (the client stays the caller's)."""
        self._fetcher.close()

    def manifest_key(self, key: str) -> str:
        """The Redis key of `key`'s manifest."""
        return f"{self.prefix}blob:{key}:manifest"

    def part_key(self, key: str, index: int) -> str:
        """The Redis key of `key`'s part number `index`."""
        return f"{self.prefix}blob:{key}:part:{index}"

    async def get(self, key: str) -> bytes | None:
        """The verified bytes, or None (a broken object's remnants are removed). The parts
        are received straight into the returned object (no join, no second copy)."""
        made: list[bytes] = []

        def allocate(size: int) -> memoryview:
            data, view = new_bytes(size) if size else (b"", memoryview(bytearray()))
            made.append(data)
            return view

        return None if await self.get_into(key, allocate) is None else made[0]

    async def get_into(self, key: str, allocate: Allocate) -> memoryview | None:
        """The verified object written into `allocate(total_bytes)`, or None (nothing written,
        or a broken object: its remnants are removed).

        `allocate` returns a writable C-contiguous memoryview of exactly the size it is given
        (of a reused or pinned staging buffer, a numpy array, a new bytearray...). Its
        contents are undefined after a None.
        """
        validate_key(key)
        with self._translate_errors():
            data = await self._read(key, allocate)
        if data is None:
            self.misses += 1
        else:
            self.hits += 1
        return data

    async def put(self, key: str, data: bytes | memoryview, ttl_s: float | None = None) -> None:
        """Write the parts (pipelined), then the manifest, then drop surplus old parts.
        `data` may be a read-only view (e.g. of a disk tier's memory map): nothing is copied
        on the host before the parts go out."""
        validate_key(key)
        ttl = _shorter(check_ttl(ttl_s), self.default_ttl_s)
        px = None if ttl is None else max(1, round(ttl * 1000))
        data = memoryview(data).cast("B")
        parts = split(data, self.part_bytes)
        manifest = await asyncio.to_thread(Manifest.of_parts, parts, data)
        with self._translate_errors():
            old = await self._manifest(key)
            pipe = self._client.pipeline(transaction=False)
            for index, part in enumerate(parts):
                pipe.set(self.part_key(key, index), part, px=px)
            await pipe.execute()
            await self._client.set(self.manifest_key(key), manifest.encode(), px=px)
            if old is not None and old.part_count > manifest.part_count:
                surplus = range(manifest.part_count, old.part_count)
                await self._client.unlink(*(self.part_key(key, i) for i in surplus))

    async def delete(self, key: str) -> bool:
        """UNLINK the manifest and its parts; True when a manifest was there."""
        validate_key(key)
        with self._translate_errors():
            raw = await self._raw_manifest(key)
            if raw is None:
                return False
            manifest = Manifest.decode(raw)
            count = 0 if manifest is None else manifest.part_count
            await self._client.unlink(*self._all_keys(key, count))
            return True

    async def exists(self, key: str) -> bool:
        """True when the manifest parses and every part is present (checksums not read)."""
        validate_key(key)
        with self._translate_errors():
            manifest = await self._manifest(key)
            if manifest is None:
                return False
            if manifest.part_count == 0:
                return True
            parts = [self.part_key(key, i) for i in range(manifest.part_count)]
            present: int = await self._client.exists(*parts)
            return present == manifest.part_count

    async def keys(self, prefix: str = "") -> list[str]:
        """Keys whose manifest exists and starts with `prefix` (SCAN over manifests), sorted."""
        head = f"{self.prefix}blob:"
        tail = ":manifest"
        match = f"{_glob_escape(head + prefix)}*{tail}"
        found: set[str] = set()
        with self._translate_errors():
            async for raw in self._client.scan_iter(match=match, count=1000):
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                found.add(name[len(head) : -len(tail)])
        return sorted(found)

    # -- internals ---------------------------------------------------------------------------

    def _all_keys(self, key: str, part_count: int) -> list[str]:
        return [self.manifest_key(key), *(self.part_key(key, i) for i in range(part_count))]

    async def _raw_manifest(self, key: str) -> bytes | None:
        raw = await self._client.get(self.manifest_key(key))
        return raw.encode() if isinstance(raw, str) else raw

    async def _manifest(self, key: str) -> Manifest | None:
        raw = await self._raw_manifest(key)
        return None if raw is None else Manifest.decode(raw)

    async def _read(self, key: str, allocate: Allocate) -> memoryview | None:
        raw = await self._raw_manifest(key)
        if raw is None:
            return None
        manifest = Manifest.decode(raw)
        if manifest is None:
            await self._discard(key, raw, 0)
            return None
        out = _writable(allocate(manifest.total_bytes), manifest.total_bytes)
        keys = [self.part_key(key, i) for i in range(manifest.part_count)]
        if not await self._fetcher.fetch(keys, manifest.sizes, manifest.part_sha256, out):
            await self._discard(key, raw, manifest.part_count)
            return None
        return out

    async def _discard(self, key: str, seen: bytes, part_count: int) -> None:
        """UNLINK a broken object unless its manifest changed since it was read as `seen`."""
        mkey = self.manifest_key(key)
        async with self._client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(mkey)
                if await pipe.get(mkey) != seen:
                    return  # replaced (or removed) by someone else: not ours to remove
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.unlink(*self._all_keys(key, part_count))
                await pipe.execute()
            except WatchError:
                return
        self.evictions += 1

    @contextlib.contextmanager
    def _translate_errors(self) -> Iterator[None]:
        """Turn every Redis failure into TierUnavailableError with the tier's name."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise TierUnavailableError(f"redis tier {self.name!r} is unreachable: {exc}") from exc
        except RedisError as exc:
            raise TierUnavailableError(f"redis tier {self.name!r} failed: {exc}") from exc
