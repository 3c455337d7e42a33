"""In-process LRU tier, bounded by bytes, with per-key TTL.

Every method does its work without awaiting, so on one event loop each call is atomic; a
`threading.Lock` also guards the state so that a second thread (the engine's executor) may
share the tier.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from storage._ttl import check_ttl
from storage.base import validate_key


@dataclass(frozen=True, slots=True)
class _Entry:
    data: bytes
    expires_at: float | None  # on the tier's clock; None = never

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class MemoryTier:
    """Least-recently-used bytes by key, holding at most `capacity_bytes` bytes of values.

    Counters (plain ints, for metrics): `hits`, `misses` (counted by `get` only), `evictions`
    (entries dropped to make room), `bytes_used` (sum of the stored values' sizes).
    An object larger than the whole capacity is not stored (and any older value is dropped).
    """

    def __init__(
        self,
        capacity_bytes: int,
        name: str = "memory",
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bytes_used = 0
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    async def get(self, key: str) -> bytes | None:
        """The stored bytes (marking the key most recently used), or None."""
        validate_key(key)
        with self._lock:
            entry = self._live(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.data

    async def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        """Store `data`, evicting least-recently-used entries until it fits."""
        validate_key(key)
        check_ttl(ttl_s)
        data = bytes(data)
        with self._lock:
            self._remove(key)
            if len(data) > self.capacity_bytes:
                return
            self._make_room(len(data))
            expires_at = None if ttl_s is None else self._clock() + ttl_s
            self._entries[key] = _Entry(data, expires_at)
            self.bytes_used += len(data)

    async def delete(self, key: str) -> bool:
        """Remove `key`; True when a live entry was removed."""
        validate_key(key)
        with self._lock:
            return self._live(key) is not None and self._remove(key)

    async def exists(self, key: str) -> bool:
        """True when `key` is stored and not expired (does not change the LRU order)."""
        validate_key(key)
        with self._lock:
            return self._live(key) is not None

    async def keys(self, prefix: str = "") -> list[str]:
        """Live keys starting with `prefix`, sorted."""
        with self._lock:
            self._purge_expired()
            return sorted(k for k in self._entries if k.startswith(prefix))

    def _live(self, key: str) -> _Entry | None:
        """The entry for `key` unless missing or expired (an expired one is dropped)."""
        entry = self._entries.get(key)
        if entry is not None and entry.expired(self._clock()):
            self._remove(key)
            return None
        return entry

    def _remove(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.bytes_used -= len(entry.data)
        return True

    def _purge_expired(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if e.expired(now)]:
            self._remove(key)

    def _make_room(self, size: int) -> None:
        """Drop expired entries, then least-recently-used ones, until `size` more bytes fit."""
        if self.bytes_used + size <= self.capacity_bytes:
            return
        self._purge_expired()
        while self.bytes_used + size > self.capacity_bytes:
            key = next(iter(self._entries))
            self._remove(key)
            self.evictions += 1
