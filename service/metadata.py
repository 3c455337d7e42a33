"""The `__metadata__` of a stored object (a safetensors file), read without torch.

The header is an 8-byte little-endian length and that many bytes of JSON; the metadata is
its `__metadata__` map of strings (service.codec writes it). Reading it needs only the
header, so a scan of the disk tier reads a few kilobytes per object, not the object.
"""

from __future__ import annotations

import json
import struct

from service.errors import CorruptContextError

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Refuse a header that claims more than this (a damaged length, not a real object)."""


def header_length(first: bytes | bytearray | memoryview) -> int:
    """Bytes of header + its 8-byte length prefix, from the object's first 8 bytes."""
    try:
        (size,) = struct.unpack("<Q", bytes(first[:8]))
    except struct.error as exc:
        raise CorruptContextError(f"stored context does not parse as safetensors: {exc}") from exc
    if size > MAX_HEADER_BYTES:
        raise CorruptContextError(f"stored context claims a {size}-byte header")
    return 8 + int(size)


def read_metadata(data: bytes | bytearray | memoryview) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (the whole object or at least its header);
    CorruptContextError when it does not parse."""
    try:
        view = memoryview(data).cast("B")
        end = header_length(view)
        header = json.loads(bytes(view[8:end]))
        meta = header["__metadata__"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptContextError(f"stored context does not parse as safetensors: {exc}") from exc
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptContextError("stored context has no metadata")
    return meta
