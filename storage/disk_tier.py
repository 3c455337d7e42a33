"""Durable tier: one file per key under a root directory.

Layout of `root`::

    <key>                     the object's bytes, exactly as given to `put`
    .<key>.ttl                JSON sidecar {"expires_at": <unix seconds>} when a TTL was given
    .<name>.<hex>.tmp         a write in progress (or a crashed one)

Names starting with "." can never be keys (see `validate_key`), so sidecars and temp files never
collide with objects, whatever the key. Every file is written to a temp file in the same
directory, flushed, fsynced and renamed over the real name with `os.replace`, so a crash never
leaves a half-written file under a real name. A new `DiskTier` over the same root sees every
object; on startup it removes temp files and orphan sidecars older than `stale_after_s` (younger
ones may belong to another process writing to a shared volume).

`get_view` reads an object without copying it: a read-only memoryview of a memory map of its
file. Files are only ever replaced by rename or unlinked, never changed in place, so a view keeps
showing the bytes of the file it mapped, for as long as it is referenced, whatever happens to the
key meanwhile.

With `capacity_bytes`, the tier is an LRU by bytes: reads touch the file's mtime and a put evicts
the least recently used files until the total fits. The directory is scanned for that, so other
processes sharing the root are accounted for. All file IO runs in `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from storage._ttl import check_ttl
from storage.base import InvalidKeyError, validate_key

T = TypeVar("T")

_SIDECAR_SUFFIX = ".ttl"
_TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True, slots=True)
class _FileInfo:
    key: str
    size: int
    mtime_ns: int


def _is_key(name: str) -> bool:
    try:
        validate_key(name)
    except InvalidKeyError:
        return False
    return True


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file + fsync + os.replace (all or nothing)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _map_file(path: Path) -> memoryview:
    """A read-only view of the whole file through a shared memory map (unmapped when the last
    reference to the view goes away)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:  # an empty file cannot be mapped
            return memoryview(b"")
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_WILLNEED"):
        mapped.madvise(mmap.MADV_WILLNEED)
    return memoryview(mapped)


def _touch(path: Path) -> None:
    """Mark `path` as just used (nanosecond mtime, finer than the kernel's coarse clock)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


class DiskTier:
    """Bytes by key as files under `root`; see the module docstring for the layout.

    Counters (plain ints, for metrics): `hits`, `misses` (counted by `get` only), `evictions`
    (files removed to make room), `bytes_used` (object bytes under root; exact after startup
    and after each eviction pass, kept up to date by this instance in between).
    """

    def __init__(
        self,
        root: Path,
        name: str = "disk",
        capacity_bytes: int | None = None,
        *,
        stale_after_s: float = 300.0,
    ) -> None:
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 or None, got {capacity_bytes}")
        self.name = name
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.stale_after_s = stale_after_s
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bytes_used = 0
        self._lock = threading.RLock()  # guards bytes_used and serialises eviction passes
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_startup()

    async def get(self, key: str) -> bytes | None:
        """The file's bytes, or None when missing or expired."""
        validate_key(key)
        return self._count(await asyncio.to_thread(self._get_sync, key))

    async def get_view(self, key: str) -> memoryview | None:
        """The file's bytes as a read-only memoryview of a memory map, or None when missing or
        expired (counted like `get`). Nothing is copied up front: pages come from the page
        cache as the view is read (the kernel is asked to read ahead the whole file)."""
        validate_key(key)
        return self._count(await asyncio.to_thread(self._get_view_sync, key))

    async def head(self, key: str, size: int) -> tuple[bytes, int] | None:
        """The object's first `size` bytes and its whole length, or None when missing or
        expired: reads no more than that (a self-describing header), and verifies nothing."""
        validate_key(key)
        return await asyncio.to_thread(self._head_sync, key, size)

    async def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        """Write `data` atomically (replacing), then evict LRU files if over capacity."""
        validate_key(key)
        check_ttl(ttl_s)
        await asyncio.to_thread(self._put_sync, key, bytes(data), ttl_s)

    async def delete(self, key: str) -> bool:
        """Remove the file and its sidecar; True when a live object was removed."""
        validate_key(key)
        return await asyncio.to_thread(self._delete_sync, key)

    async def exists(self, key: str) -> bool:
        """True when the file exists and has not expired."""
        validate_key(key)
        return await asyncio.to_thread(self._exists_sync, key)

    async def keys(self, prefix: str = "") -> list[str]:
        """Live keys starting with `prefix`, sorted (temp files and sidecars are ignored)."""
        return await asyncio.to_thread(self._keys_sync, prefix)

    # -- paths -----------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / key

    def _sidecar(self, key: str) -> Path:
        return self.root / f".{key}{_SIDECAR_SUFFIX}"

    # -- synchronous halves (run in a worker thread) ---------------------------------------

    def _get_sync(self, key: str) -> bytes | None:
        if self._expire_if_due(key):
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        self._touch_quietly(path)
        return data

    def _get_view_sync(self, key: str) -> memoryview | None:
        if self._expire_if_due(key):
            return None
        path = self._path(key)
        try:
            view = _map_file(path)
        except (FileNotFoundError, IsADirectoryError):
            return None
        self._touch_quietly(path)
        return view

    def _head_sync(self, key: str, size: int) -> tuple[bytes, int] | None:
        if self._expire_if_due(key):
            return None
        try:
            with self._path(key).open("rb") as file:
                return file.read(size), os.fstat(file.fileno()).st_size
        except (FileNotFoundError, IsADirectoryError):
            return None

    def _put_sync(self, key: str, data: bytes, ttl_s: float | None) -> None:
        old_size = self._size(key)
        if self.capacity_bytes is not None and len(data) > self.capacity_bytes:
            self._remove(key)
            return
        self._write_expiry(key, ttl_s)  # first: a crash in between leaves the new expiry
        path = self._path(key)
        _write_atomic(path, data)
        _touch(path)
        self._account(len(data) - old_size)
        if self.capacity_bytes is not None:
            self._evict(self.capacity_bytes, protect=key)

    def _delete_sync(self, key: str) -> bool:
        live = not self._expire_if_due(key) and self._path(key).is_file()
        self._remove(key)
        return live

    def _exists_sync(self, key: str) -> bool:
        return not self._expire_if_due(key) and self._path(key).is_file()

    def _keys_sync(self, prefix: str) -> list[str]:
        found = [info.key for info in self._scan() if info.key.startswith(prefix)]
        return sorted(k for k in found if not self._expire_if_due(k))

    def _count(self, data: T) -> T:
        """`data` unchanged, counted as a hit, or as a miss when it is None."""
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
        _write_atomic(sidecar, body)

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

    def _expire_if_due(self, key: str) -> bool:
        """Remove `key` when its expiry has passed; True when it was expired."""
        expires_at = self._expires_at(key)
        if expires_at is None or time.time() < expires_at:
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

    def _touch_quietly(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):  # removed since the read: still a hit
            _touch(path)

    def _scan(self) -> list[_FileInfo]:
        """Every object file under root (not sidecars, not temp files)."""
        infos = []
        with os.scandir(self.root) as it:
            for entry in it:
                if not _is_key(entry.name):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.is_file():
                    infos.append(_FileInfo(entry.name, st.st_size, st.st_mtime_ns))
        return infos

    def _evict(self, capacity: int, protect: str) -> None:
        """Remove least-recently-used objects (never `protect`) until `capacity` fits."""
        with self._lock:
            infos = self._scan()
            total = sum(i.size for i in infos)
            for info in sorted(infos, key=lambda i: (i.mtime_ns, i.key)):
                if total <= capacity:
                    break
                if info.key == protect:
                    continue
                self._remove(info.key)
                total -= info.size
                self.evictions += 1
            self.bytes_used = total

    def _clean_startup(self) -> None:
        """Drop stale temp files and orphan sidecars; measure `bytes_used`."""
        cutoff = time.time() - self.stale_after_s
        with os.scandir(self.root) as it:
            hidden = [Path(e.path) for e in it if e.name.startswith(".") and e.is_file()]
        for path in hidden:
            if self._is_stale_leftover(path, cutoff):
                path.unlink(missing_ok=True)
        self.bytes_used = sum(i.size for i in self._scan())

    def _is_stale_leftover(self, path: Path, cutoff: float) -> bool:
        """A temp file or orphan sidecar last modified before `cutoff` (unix seconds)."""
        if not (path.name.endswith(_TEMP_SUFFIX) or self._orphan_sidecar(path.name)):
            return False
        try:
            return path.stat().st_mtime <= cutoff
        except FileNotFoundError:
            return False

    def _orphan_sidecar(self, name: str) -> bool:
        if not name.endswith(_SIDECAR_SUFFIX):
            return False
        key = name[1 : -len(_SIDECAR_SUFFIX)]
        return _is_key(key) and not self._path(key).exists()
