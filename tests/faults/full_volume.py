"""`python -m tests.faults.full_volume`: a kvzip worker whose data volume has a size.

The size, in bytes, is read from the file named by FAULTS_VOLUME_SIZE_FILE before every
write of the disk tier (no file: no limit); a write that would take the files under
KVZIP_DATA_DIR past it fails with ENOSPC, as on a full filesystem (the files of other
programs there count too). Everything else is the worker as shipped (`kvzip worker`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import storage.disk_tier
from app.cli import main

_write_atomic = storage.disk_tier.write_atomic


def used_bytes(volume: Path) -> int:
    return sum(p.stat().st_size for p in volume.rglob("*") if p.is_file())


def volume_size() -> int | None:
    size_file = Path(os.environ["FAULTS_VOLUME_SIZE_FILE"])
    return int(size_file.read_text()) if size_file.is_file() else None


def write_atomic(path: Path, chunks: Sequence[bytes | memoryview]) -> None:
    size = volume_size()
    volume = Path(os.environ["KVZIP_DATA_DIR"])
    if size is not None and used_bytes(volume) + sum(len(c) for c in chunks) > size:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    _write_atomic(path, chunks)


if __name__ == "__main__":
    storage.disk_tier.write_atomic = write_atomic  # type: ignore[assignment]
    raise SystemExit(main(["worker"]))
