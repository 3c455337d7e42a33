"""One asyncio lock per key (a context id), alive only while someone holds or awaits it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyedLocks:
    """`async with locks.hold(key)`: one holder per key at a time, first come first served."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (lock, holder + waiters)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def waiting(self, key: str) -> int:
        """How many wait for `key` (its holder not counted)."""
        lock, users = self._locks.get(key, (None, 0))
        return users - 1 if lock is not None and lock.locked() else users
