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

import re
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
