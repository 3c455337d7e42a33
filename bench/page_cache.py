"""Dropping a file's pages from the OS page cache, so the next read comes from the disk."""

from __future__ import annotations

import os
from pathlib import Path


def drop(path: Path) -> None:
    """fsync `path`, then posix_fadvise(DONTNEED) over it (pages still mapped stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_all(root: Path) -> list[Path]:
    """`drop` every file under `root`; returns them."""
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        drop(path)
    return files
