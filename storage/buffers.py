"""A new `bytes` object filled in place: the one full-size buffer of a large read or write.

`bytes(n)` zero-fills and `b"".join(...)` copies; for objects of a gigabyte either costs a
full pass over memory. CPython's own constructor with a NULL source leaves the contents
uninitialised for the caller to fill before anyone else sees the object (what C extensions
do); `new_bytes` wraps it with a writable memoryview of the contents.
"""

from __future__ import annotations

import ctypes

_bytes_uninitialised = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
    ("PyBytes_FromStringAndSize", ctypes.pythonapi)
)
_bytes_address = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object)(
    ("PyBytes_AsString", ctypes.pythonapi)
)


def new_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new `bytes` of `size` (>= 1) uninitialised bytes and a writable view of them.

    The caller must write every byte before the object is used anywhere else (hashed,
    compared, handed out).
    """
    if size < 1:
        raise ValueError("an empty bytes object is a shared singleton: nothing to fill")
    out: bytes = _bytes_uninitialised(None, size)
    address = _bytes_address(out)
    return out, memoryview((ctypes.c_char * size).from_address(address)).cast("B")
