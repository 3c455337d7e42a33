"""SHA-256 checksums of stored objects (private to storage/).

Large objects are hashed in parts on up to 16 threads, leaving two cores to the rest of the
process (hashlib releases the GIL), so that verifying a GB-sized context costs a fraction
of a second on a many-core host (bench/gpu/load_parts.py measures 4, 8 and 16). The disk
tier's digest of an object is the SHA-256 of its parts' hex digests (`tree_digest`); the
Redis tier keeps one digest per part in its manifest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

PART_BYTES = 32 * 1024 * 1024
_THREADS = max(2, min(16, (os.cpu_count() or 2) - 2))


def sha256_all(parts: Sequence[bytes | memoryview]) -> list[str]:
    """Hex SHA-256 of every part, computed on up to `_THREADS` threads when there are several."""
    if len(parts) < 2:
        return [hashlib.sha256(p).hexdigest() for p in parts]
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(parts))) as pool:
        return list(pool.map(lambda p: hashlib.sha256(p).hexdigest(), parts))


def split(data: bytes | memoryview, part_bytes: int = PART_BYTES) -> list[memoryview]:
    """`data` as views of at most `part_bytes` bytes each (no copy)."""
    view = memoryview(data)
    return [view[i : i + part_bytes] for i in range(0, len(view), part_bytes)]


def tree_digest(data: bytes | memoryview, part_bytes: int = PART_BYTES) -> bytes:
    """32 bytes: SHA-256 over the hex SHA-256 of each `part_bytes` part of `data`."""
    joined = "".join(sha256_all(split(data, part_bytes)))
    return hashlib.sha256(joined.encode()).digest()
