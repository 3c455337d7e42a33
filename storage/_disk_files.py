"""The files of the disk tier (private): atomic writes, and objects framed by a checksum.

A stored object's file is a 64-byte header, then the object's bytes::

    0   8 bytes   magic b"\\x89KVZOBJ\\n"
    8   u64 LE    the object's length in bytes
    16  u64 LE    part size of the digest (storage._checksum.tree_digest)
    24  32 bytes  SHA-256 tree digest of the object's bytes
    56  8 bytes   zero

The header keeps the bytes 64-aligned (a memory map of them stays aligned for tensors). A
file that does not start with the magic was written before checksums existed: its bytes are
the object, served unverified. A file with the magic whose length or digest does not match
is damaged (truncated, extended or changed): `Damaged`. A safetensors object never starts
with the magic (its first 8 bytes are a header length) and a JSON record starts with "{".
"""

from __future__ import annotations

import mmap
import os
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from storage._checksum import PART_BYTES, tree_digest
from storage.base import InvalidKeyError, validate_key

MAGIC = b"\x89KVZOBJ\n"
_HEADER = struct.Struct("<8sQQ32s8x")
HEADER_BYTES = _HEADER.size
TEMP_SUFFIX = ".tmp"


class Damaged(Exception):
    """A framed file whose length or checksum does not match its header (the reason)."""


def header(data: bytes | memoryview) -> bytes:
    """The header that frames `data` (its length and digest)."""
    return _HEADER.pack(MAGIC, len(data), PART_BYTES, tree_digest(data, PART_BYTES))


def verified(head: bytes, payload: bytes | memoryview) -> None:
    """Nothing when `payload` is what the header `head` describes; else Damaged."""
    if len(head) < HEADER_BYTES:
        raise Damaged(f"truncated: {len(head)} bytes, shorter than the 64-byte header")
    magic, length, part_bytes, digest = _HEADER.unpack_from(head)
    if len(payload) != length:
        raise Damaged(f"{len(payload)} bytes stored where the header says {length}")
    if part_bytes < 1 or tree_digest(payload, part_bytes) != digest:
        raise Damaged("the bytes do not match their checksum")


def framed(head: bytes) -> bool:
    """True when a file starting with `head` carries a header (or the start of one)."""
    if head.startswith(MAGIC):
        return True
    return 0 < len(head) < len(MAGIC) and MAGIC.startswith(head)


def read_object(path: Path) -> bytes:
    """The verified bytes of the object in `path` (Damaged when they fail)."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        rest = f.read()
    if not framed(head):
        return head + rest  # written before checksums: served as it is
    verified(head, rest)
    return rest


def open_object(path: Path) -> tuple[memoryview, Callable[[], None]]:
    """The object in `path` as a read-only view of a shared memory map, before its bytes
    are checked, and the check: a call that returns when they match their header, else
    raises Damaged (files written before checksums: a check that passes)."""
    view = _map_file(path)
    head = bytes(view[:HEADER_BYTES])
    if not framed(head):
        return view, lambda: None
    payload = view[HEADER_BYTES:]
    return payload, lambda: verified(head, payload)


def _map_file(path: Path) -> memoryview:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:  # an empty file cannot be mapped
            return memoryview(b"")
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_WILLNEED"):
        mapped.madvise(mmap.MADV_WILLNEED)
    return memoryview(mapped)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, chunks: Sequence[bytes | memoryview]) -> None:
    """Write `chunks` to `path` through a temp file + fsync + os.replace (all or nothing)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@dataclass(frozen=True, slots=True)
class FileInfo:
    key: str
    size: int
    mtime_ns: int  # the last read or write (the tier sets it: see `touch`)


def is_key(name: str) -> bool:
    try:
        validate_key(name)
    except InvalidKeyError:
        return False
    return True


def scan(root: Path) -> list[FileInfo]:
    """Every object file under `root` (not sidecars, not temp files)."""
    infos = []
    with os.scandir(root) as it:
        for entry in it:
            if not is_key(entry.name):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.is_file():
                infos.append(FileInfo(entry.name, st.st_size, st.st_mtime_ns))
    return infos


def touch(path: Path) -> None:
    """Mark `path` as just used: its access and modification times set to now, in
    nanoseconds (finer than the kernel's coarse clock, and whatever the mount's atime)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


SIDECAR_SUFFIX = ".ttl"  # `.<key>.ttl`: the expiry of `<key>`


def stale_leftovers(root: Path, cutoff: float) -> list[Path]:
    """Temp files and orphan sidecars under `root` last modified before `cutoff` (unix
    seconds): what a crashed write or a removed object left behind."""
    with os.scandir(root) as it:
        hidden = [Path(e.path) for e in it if e.name.startswith(".") and e.is_file()]
    return [p for p in hidden if _leftover(root, p.name) and _modified_before(p, cutoff)]


def _leftover(root: Path, name: str) -> bool:
    if name.endswith(TEMP_SUFFIX):
        return True
    if not name.endswith(SIDECAR_SUFFIX):
        return False
    key = name[1 : -len(SIDECAR_SUFFIX)]
    return is_key(key) and not (root / key).exists()


def _modified_before(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime <= cutoff
    except FileNotFoundError:
        return False
