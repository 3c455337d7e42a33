"""Durable tier: one file per key under a root directory, each verified by a checksum.

Layout of `root`::

    <key>                     a 64-byte header (length, SHA-256), then the object's bytes
                              (storage._disk_files; files written before checksums existed
                              hold the bare bytes and are served unverified)
    .<key>.ttl                JSON sidecar {"expires_at": <unix seconds>} when a TTL was given
    .<name>.<hex>.tmp         a write in progress (or a crashed one)

Names starting with "." can never be keys (see `validate_key`), so sidecars and temp files never
collide with objects, whatever the key. Every file is written to a temp file in the same
directory, flushed, fsynced and renamed over the real name with `os.replace`, so a crash never
leaves a half-written file under a real name. A new `DiskTier` over the same root sees every
object; on startup it removes temp files and orphan sidecars older than `stale_after_s` (younger
ones may belong to another process writing to a shared volume).

Integrity: every read (`get`, `get_view`) checks the length and the checksum in the header. A
damaged object (changed, truncated or extended) is never served: it is removed and
CorruptObjectError raised (counted in `corruptions`), so that a caller can fall back to
another tier and write a good copy back.

`get_view` reads an object without copying it: a read-only memoryview of a memory map of its
file (past the header). Files are only ever replaced by rename or unlinked, never changed in
place, so a view keeps showing the bytes of the file it mapped, for as long as it is
referenced, whatever happens to the key meanwhile.

Capacity: with `capacity_bytes`, a put that would take the files over it first evicts, among
the keys `evictable` allows, the expired ones, then the least recently used (each read sets
the file's times itself, so this works on a volume mounted noatime), until the new file fits;
an object that cannot fit raises TierFullError and changes nothing. A write that finds the
disk full (ENOSPC) evicts as much as the file needs and tries once more. The directory is
scanned for that, so other processes sharing the root are accounted for. Each evicted key is
reported to the `on_evict` hooks. All file IO runs in `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from storage._disk_files import (
    HEADER_BYTES,
    SIDECAR_SUFFIX,
    Damaged,
    FileInfo,
    framed,
    header,
    open_object,
    read_object,
    scan,
    stale_leftovers,
    touch,
    write_atomic,
)
from storage._ttl import check_ttl
from storage.base import CorruptObjectError, PendingRead, TierFullError, validate_key

__all__ = ["HEADER_BYTES", "DiskTier"]

T = TypeVar("T")
log = logging.getLogger(__name__)

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskTier:
    """Bytes by key as files under `root`; see the module docstring for the layout.

    Counters (plain ints, for metrics): `hits`, `misses` (counted by `get` and `get_view`),
    `evictions` (files removed to make room), `corruptions` (damaged files found and
    removed), `bytes_used` (file bytes under root, headers included; exact after startup
    and after each eviction pass, kept up to date by this instance in between).
    """

    def __init__(
        self,
        root: Path,
        name: str = "disk",
        capacity_bytes: int | None = None,
        *,
        stale_after_s: float = 300.0,
        evictable: Callable[[str], bool] | None = None,
    ) -> None:
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 or None, got {capacity_bytes}")
        self.name = name
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.stale_after_s = stale_after_s
        self.evictable = evictable or (lambda key: True)
        self.on_evict: list[Callable[[str], Awaitable[None]]] = []
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.corruptions = 0
        self.bytes_used = 0
        self._evicted: list[str] = []  # evicted keys not yet reported to on_evict
        self._lock = threading.RLock()  # guards the counters and serialises eviction passes
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_startup()

    async def get(self, key: str) -> bytes | None:
        """The verified bytes, or None when missing or expired (CorruptObjectError when
        damaged: the file is removed)."""
        validate_key(key)
        return self._count(await asyncio.to_thread(self._read_sync, key, read_object))

    async def get_view(self, key: str) -> memoryview | None:
        """The verified bytes as a read-only memoryview of a memory map, or None when missing
        or expired (counted like `get`; CorruptObjectError when damaged). Nothing is copied:
        pages come from the page cache as they are hashed and read (the kernel is asked to
        read ahead the whole file)."""
        pending = await self.open_view(key)
        return None if pending is None else await pending.settled  # type: ignore[return-value]

    async def open_view(self, key: str) -> PendingRead | None:
        """`get_view` that returns the map at once, its checksum running in the background
        (`settled`: the view once verified, else CorruptObjectError, the file removed)."""
        validate_key(key)
        opened = self._count(await asyncio.to_thread(self._read_sync, key, open_object))
        if opened is None:
            return None
        view, verify = opened
        check = asyncio.to_thread(self._verify_sync, key, view, verify)
        return PendingRead(view, asyncio.ensure_future(check))

    def _verify_sync(
        self, key: str, view: memoryview, verify: Callable[[], None]
    ) -> memoryview:
        try:
            verify()
        except Damaged as exc:
            raise self._drop_damaged(key, str(exc)) from exc
        return view

    async def head(self, key: str, size: int) -> tuple[bytes, int] | None:
        """The object's first `size` bytes and its whole length (past the checksum header
        of a framed file), or None when missing or expired: reads no more than that (a
        self-describing header), and verifies nothing."""
        validate_key(key)
        return await asyncio.to_thread(self._head_sync, key, size)

    async def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        """Write `data` atomically (replacing), evicting first if it would not fit."""
        validate_key(key)
        check_ttl(ttl_s)
        try:
            await asyncio.to_thread(self._put_sync, key, bytes(data), ttl_s)
        finally:
            await self._report_evictions()

    async def delete(self, key: str) -> bool:
        """Remove the file and its sidecar; True when a live object was removed."""
        validate_key(key)
        return await asyncio.to_thread(self._delete_sync, key)

    async def exists(self, key: str) -> bool:
        """True when the file exists and has not expired (its checksum is not read)."""
        validate_key(key)
        return await asyncio.to_thread(self._exists_sync, key)

    async def keys(self, prefix: str = "") -> list[str]:
        """Live keys starting with `prefix`, sorted (temp files and sidecars are ignored)."""
        return await asyncio.to_thread(self._keys_sync, prefix)

    async def retain(self, key: str, ttl_s: float) -> bool:
        """Keep `key` at least `ttl_s` more seconds: an expiry only moves later (an object
        without one keeps none). False when the object is not stored."""
        validate_key(key)
        check_ttl(ttl_s)
        return await asyncio.to_thread(self._retain_sync, key, ttl_s)

    # -- paths -----------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / key

    def _sidecar(self, key: str) -> Path:
        return self.root / f".{key}{SIDECAR_SUFFIX}"

    # -- synchronous halves (run in a worker thread) ---------------------------------------

    def _read_sync(self, key: str, read: Callable[[Path], T]) -> T | None:
        if self._expire_if_due(key):
            return None
        path = self._path(key)
        try:
            data = read(path)
        except (FileNotFoundError, IsADirectoryError):
            return None
        except Damaged as exc:
            raise self._drop_damaged(key, str(exc)) from exc
        with contextlib.suppress(FileNotFoundError):  # removed since the read: still a hit
            touch(path)
        return data

    def _drop_damaged(self, key: str, reason: str) -> CorruptObjectError:
        """Remove a damaged object; the error to raise (with the lifetime it had left)."""
        expires_at = self._expires_at(key)
        ttl_s = None if expires_at is None else max(expires_at - time.time(), 1.0)
        self._remove(key)
        with self._lock:
            self.corruptions += 1
        log.error("disk tier %r: %s is damaged (%s); removed", self.name, key, reason)
        return CorruptObjectError(
            f"disk tier {self.name!r}: stored object {key!r} is damaged ({reason}); removed",
            key,
            ttl_s,
        )

    def _head_sync(self, key: str, size: int) -> tuple[bytes, int] | None:
        if self._expire_if_due(key):
            return None
        try:
            with self._path(key).open("rb") as file:
                total = os.fstat(file.fileno()).st_size
                start = file.read(HEADER_BYTES)
                if framed(start):  # the object's bytes follow the checksum header
                    return file.read(size), total - HEADER_BYTES
                return (start + file.read(max(0, size - len(start))))[:size], total
        except (FileNotFoundError, IsADirectoryError):
            return None

    def _put_sync(self, key: str, data: bytes, ttl_s: float | None) -> None:
        head = header(data)
        size = len(head) + len(data)
        if self.capacity_bytes is not None:
            self._make_room(key, size, self.capacity_bytes)
        old_size = self._size(key)
        try:
            self._write(key, (head, data), ttl_s)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            self._make_room(key, size, self._scanned_total(key), "the disk is full")
            try:
                self._write(key, (head, data), ttl_s)
            except OSError as again:
                if again.errno not in _DISK_FULL:
                    raise
                raise TierFullError(
                    f"disk tier {self.name!r}: the disk is full; {key!r} ({size} bytes) was "
                    "not written"
                ) from again
        self._account(size - old_size)

    def _write(self, key: str, chunks: tuple[bytes, bytes], ttl_s: float | None) -> None:
        self._write_expiry(key, ttl_s)  # first: a crash in between leaves the new expiry
        path = self._path(key)
        write_atomic(path, chunks)
        touch(path)

    def _delete_sync(self, key: str) -> bool:
        live = not self._expire_if_due(key) and self._path(key).is_file()
        self._remove(key)
        return live

    def _exists_sync(self, key: str) -> bool:
        return not self._expire_if_due(key) and self._path(key).is_file()

    def _keys_sync(self, prefix: str) -> list[str]:
        found = [info.key for info in self._scan() if info.key.startswith(prefix)]
        return sorted(k for k in found if not self._expire_if_due(k))

    def _retain_sync(self, key: str, ttl_s: float) -> bool:
        if not self._path(key).is_file():
            return False
        expires_at = self._expires_at(key)
        if expires_at is not None and expires_at < time.time() + ttl_s:
            self._write_expiry(key, ttl_s)
        return True

    def _count(self, data: T) -> T:
        """`data` unchanged, counted as a hit, or as a miss when it is None."""
        with self._lock:
            if data is None:
                self.misses += 1
            else:
                self.hits += 1
        return data

    # -- expiry ----------------------------------------------------------------------------

    def _write_expiry(self, key: str, ttl_s: float | None) -> None:
        sidecar = self._sidecar(key)
        if ttl_s is None:
            sidecar.unlink(missing_ok=True)
            return
        body = json.dumps({"expires_at": time.time() + ttl_s}).encode()
        write_atomic(sidecar, (body,))

    def _expires_at(self, key: str) -> float | None:
        """The key's expiry (unix seconds), None when it has none; an unreadable one is now."""
        try:
            raw = self._sidecar(key).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return float(json.loads(raw)["expires_at"])
        except (ValueError, KeyError, TypeError):
            return 0.0  # a damaged sidecar: treat the object as expired rather than immortal

    def _expired(self, key: str) -> bool:
        expires_at = self._expires_at(key)
        return expires_at is not None and time.time() >= expires_at

    def _expire_if_due(self, key: str) -> bool:
        """Remove `key` when its expiry has passed; True when it was expired."""
        if not self._expired(key):
            return False
        self._remove(key)
        return True

    # -- removal, capacity, startup --------------------------------------------------------

    def _remove(self, key: str) -> None:
        """Unlink the object then its sidecar, keeping `bytes_used` in step."""
        size = self._size(key)
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        else:
            self._account(-size)
        self._sidecar(key).unlink(missing_ok=True)

    def _account(self, delta: int) -> None:
        with self._lock:
            self.bytes_used += delta

    def _size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return 0

    def _scan(self) -> list[FileInfo]:
        return scan(self.root)

    def _scanned_total(self, protect: str) -> int:
        return sum(i.size for i in self._scan() if i.key != protect)

    def _make_room(self, protect: str, size: int, limit: int, why: str = "") -> None:
        """Evict until the other files plus `size` bytes fit in `limit`: expired objects
        first, then least recently used; never `protect` (the key being written) nor a key
        `evictable` keeps. TierFullError (saying `why`, by default the capacity), evicting
        nothing, when they cannot fit."""
        with self._lock:
            infos = self._scan()
            total = sum(i.size for i in infos if i.key != protect)
            if total + size > limit:
                candidates = self._eviction_order(infos, protect)
                kept = total - sum(i.size for i in candidates)
                if kept + size > limit:
                    raise TierFullError(
                        f"disk tier {self.name!r}: {why or f'capacity {self.capacity_bytes}'}; "
                        f"an object of {size} bytes does not fit in {limit} bytes ({kept} "
                        "bytes held may not be evicted)"
                    )
                total = self._evict(candidates, total, limit - size)
            self.bytes_used = total + self._size(protect)

    def _evict(self, candidates: list[FileInfo], total: int, target: int) -> int:
        """Remove `candidates` in order until `total` is at most `target`; the new total."""
        for info in candidates:
            if total <= target:
                break
            self._remove(info.key)
            total -= info.size
            self.evictions += 1
            self._evicted.append(info.key)
        return total

    def _eviction_order(self, infos: list[FileInfo], protect: str) -> list[FileInfo]:
        """The files that may go, in the order they go: expired first, then oldest use."""
        candidates = [i for i in infos if i.key != protect and self.evictable(i.key)]
        if not candidates:
            return []
        return sorted(candidates, key=lambda i: (not self._expired(i.key), i.mtime_ns, i.key))

    async def _report_evictions(self) -> None:
        """Tell every `on_evict` hook about each key evicted since the last report."""
        with self._lock:
            evicted, self._evicted = self._evicted, []
        for key in evicted:
            for hook in self.on_evict:
                try:
                    await hook(key)
                except Exception:
                    log.exception("disk tier %r: eviction hook failed for %s", self.name, key)

    def _clean_startup(self) -> None:
        """Drop stale temp files and orphan sidecars; measure `bytes_used`."""
        for path in stale_leftovers(self.root, time.time() - self.stale_after_s):
            path.unlink(missing_ok=True)
        self.bytes_used = sum(i.size for i in self._scan())
