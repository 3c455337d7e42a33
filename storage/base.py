"""The byte-tier contract. storage/ moves bytes by key; it knows nothing of models or tensors.

Errors::

    StorageError            root of everything storage/ raises on purpose
    ├── InvalidKeyError     a key outside the allowed alphabet (see `validate_key`)
    ├── TierUnavailableError  a remote tier (Redis) cannot be reached
    ├── CorruptObjectError  a stored object failed its checksum or is truncated (the tier
    │                       removed it before raising)
    └── TierFullError       the tier cannot hold an object: larger than its capacity, or
                            its disk is full even after evicting what it may
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Protocol

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,199}$")


class StorageError(Exception):
    """Root of every error raised on purpose by storage/."""


class InvalidKeyError(StorageError):
    """The key is not a safe name (letters, digits, `_.:=-`, at most 200 characters)."""


class TierUnavailableError(StorageError):
    """A tier's backing service cannot be reached."""


class CorruptObjectError(StorageError):
    """A stored object failed its checksum, or is truncated; the tier removed it.

    `ttl_s`: the lifetime the object had left (None: none), so that a good copy from
    another tier can be written back with it.
    """

    def __init__(self, message: str, key: str, ttl_s: float | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.ttl_s = ttl_s


class TierFullError(StorageError):
    """The tier cannot hold the object (larger than its capacity, or its disk is full)."""


@dataclass(frozen=True)
class PendingRead:
    """An object handed out before its checksum has been checked, so that the caller's use
    of it and the check run at the same time (`open_view`).

    data: the bytes as stored, readable at once; nothing made from them may be served
    before `settled` has ended with this very object.
    settled: ends with the bytes to keep: `data` itself once it matched its checksum, or
    (from a TieredStore) a good copy from another tier when it did not (the damaged copy
    dropped and written back), or None when no tier holds the object intact. A single tier's
    read raises CorruptObjectError instead (it has removed its copy).
    """

    data: bytes | memoryview
    settled: asyncio.Future[bytes | memoryview | None]

    @staticmethod
    def of(data: bytes | memoryview) -> PendingRead:
        """Bytes that are already verified (or need no check)."""
        done: asyncio.Future[bytes | memoryview | None] = asyncio.get_running_loop().create_future()
        done.set_result(data)
        return PendingRead(data, done)


def validate_key(key: str) -> str:
    """Return `key` unchanged, or raise InvalidKeyError (keys become file names on disk)."""
    if not _KEY.match(key):
        raise InvalidKeyError(f"invalid storage key {key!r}")
    return key


class Tier(Protocol):
    """One storage tier: bytes by key. All methods are coroutines; none blocks the loop."""

    name: str

    async def get(self, key: str) -> bytes | None:
        """The stored bytes, or None on a miss. A tier that verifies checksums raises
        CorruptObjectError for a damaged object (after removing it) or returns None."""

    async def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        """Store `data` under `key` (replacing), optionally expiring after `ttl_s` seconds."""

    async def delete(self, key: str) -> bool:
        """Remove `key`; True when something was removed."""

    async def exists(self, key: str) -> bool:
        """True when `key` is stored (and not expired)."""

    async def keys(self, prefix: str = "") -> list[str]:
        """All stored keys starting with `prefix`, sorted."""
