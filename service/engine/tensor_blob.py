"""Fast safetensors packing and unpacking for large KV objects.

Same bytes on disk as the `safetensors` library writes (8-byte little-endian header size,
a JSON header with dtype/shape/data_offsets and `__metadata__`, padded with spaces to 8
bytes, then the tensor data back to back). The `safetensors` library stays the reference
reader/writer (tests check both directions).

Moving the bytes is what costs (about 1.3 GB for a 32K-token Llama-3.1-8B context), so:

- `pack` allocates the result `bytes` once, uninitialised, and writes every byte of it exactly
  once (no zero fill, no second full-size copy). CUDA tensors travel through a small ring of
  pinned host buffers (`STAGING_SLOTS` x `STAGING_BYTES`) on a side stream: while the host
  copies one staged window into the result, the DMA of the next windows runs.
- `unpack` to a CUDA device streams the data region through the same ring the other way
  (host copy of window i+1 into pinned memory overlaps the DMA of window i) into one device
  buffer, and slices views out of it (tensors whose offset is not 16-byte aligned are copied
  instead: vectorised GPU kernels need that alignment). The source may be any bytes-like
  object, e.g. a memoryview of a memory-mapped file, so page-cache pages go straight to the
  pinned ring without an intermediate full-size buffer.

Host-side copies are `torch.Tensor.copy_`, which uses torch's intra-op threads.
"""

from __future__ import annotations

import contextlib
import json
import struct
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from storage.buffers import new_bytes

STAGING_SLOTS = 4
STAGING_BYTES = 32 * 1024 * 1024

ByteSource = bytes | bytearray | memoryview
"""What `unpack` reads: any C-contiguous bytes-like object (e.g. a memoryview of an mmap)."""

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3",
}
_FROM_NAME = {name: dtype for dtype, name in _DTYPES.items()}


@dataclass(frozen=True, slots=True)
class _Span:
    """One tensor's bytes `data` (flat uint8, any device) at `start` of the data region."""

    start: int
    data: torch.Tensor

    @property
    def stop(self) -> int:
        return self.start + self.data.numel()


class _StagingRing:
    """`slots` pinned host buffers of `slot_bytes` each, shared by every transfer.

    One transfer at a time holds the ring (`session`). `_events[k]` marks the last DMA that
    read or wrote buffer k; `acquire(k)` waits for it, so a buffer is never overwritten while
    in flight (also across calls: an upload returns before its last DMAs finish).
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._lock = threading.Lock()
        self._buffers: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._stream: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def session(self, device: torch.device) -> Iterator[None]:
        """Hold the ring; copies queued inside run on a side stream of `device` that starts
        after, and is waited for by, the current stream (the callers' producers/consumers)."""
        with self._lock:
            current = torch.cuda.current_stream(device)
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            self._stream = self._streams[device]
            self._stream.wait_stream(current)
            try:
                with torch.cuda.stream(self._stream):
                    yield
            finally:
                current.wait_stream(self._stream)
                self._stream = None

    def acquire(self, k: int) -> torch.Tensor:
        """Pinned buffer k (slot_bytes,) uint8, once its last DMA has finished."""
        if not self._buffers:
            self._buffers = [self._allocate() for _ in range(self.slots)]
        event = self._events[k]
        if event is not None:
            event.synchronize()
            self._events[k] = None
        return self._buffers[k]

    def release(self, k: int) -> torch.cuda.Event:
        """Mark buffer k busy until the copies queued so far in this session are done."""
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._stream)
        self._events[k] = event
        return event

    def _allocate(self) -> torch.Tensor:
        return torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)


_RING = _StagingRing(STAGING_SLOTS, STAGING_BYTES)


def pack(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """name -> tensor (any devices) => safetensors bytes.

    Largest tensors first: KV blocks (N * d * 2 bytes, d a multiple of 8) then start at
    16-byte aligned offsets, which fused GPU kernels need for their vector loads.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].numel() * tensors[n].element_size(), n))
    header: dict[str, object] = {"__metadata__": metadata}
    spans: list[_Span] = []
    offset = 0
    for name in order:
        t = tensors[name].contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        spans.append(_Span(offset, t.reshape(-1).view(torch.uint8)))
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    out, view = _new_bytes(len(prefix) + offset)
    view[: len(prefix)].copy_(torch.frombuffer(bytearray(prefix), dtype=torch.uint8))
    _gather(view[len(prefix) :], spans)
    return out


def _new_bytes(size: int) -> tuple[bytes, torch.Tensor]:
    """A new `bytes` of `size` (>= 1) uninitialised bytes and a writable (size,) uint8 view.

    The caller must write every byte before the object is used anywhere else.
    """
    out, view = new_bytes(size)
    return out, torch.frombuffer(view, dtype=torch.uint8)


def _gather(host: torch.Tensor, spans: list[_Span]) -> None:
    """host[s.start : s.stop] = s.data for every span; host (total,) uint8 on the CPU.

    The spans must tile host exactly. CPU spans are copied directly; as soon as one span is
    on a CUDA device, everything goes through the pinned ring (`_download`).
    """
    if sum(s.data.numel() for s in spans) != host.numel():
        raise ValueError("spans do not cover the packed data region")
    cuda = [s.data.device for s in spans if s.data.is_cuda]
    if not cuda:
        for s in spans:
            host[s.start : s.stop].copy_(s.data)
        return
    device = cuda[0]  # spans on other GPUs join it first: one stream orders every DMA
    spans = [_Span(s.start, s.data.to(device)) if s.data.is_cuda else s for s in spans]
    _download(host, spans, device, _RING)


def _windows(total: int, size: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) windows of at most `size` bytes covering [0, total)."""
    for lo in range(0, total, size):
        yield lo, min(lo + size, total)


def _pieces(spans: list[_Span], lo: int, hi: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset in the window, bytes) of every span's part inside the window [lo, hi)."""
    for s in spans:
        a, b = max(s.start, lo), min(s.stop, hi)
        if a < b:
            yield a - lo, s.data[a - s.start : b - s.start]


def _download(
    host: torch.Tensor, spans: list[_Span], device: torch.device, ring: _StagingRing
) -> None:
    """Fill host (total,) uint8 from spans (CUDA or CPU) window by window through `ring`.

    Up to `ring.slots` windows are in flight: the DMA of the newest ones runs while the
    host copies the oldest finished window out of its pinned buffer.
    """
    in_flight: list[tuple[int, int, int, torch.cuda.Event]] = []  # (slot, lo, hi, done)
    with ring.session(device):
        for i, (lo, hi) in enumerate(_windows(host.numel(), ring.slot_bytes)):
            if len(in_flight) == ring.slots:
                _drain(host, ring, *in_flight.pop(0))
            k = i % ring.slots
            slot = ring.acquire(k)
            for at, piece in _pieces(spans, lo, hi):
                slot[at : at + piece.numel()].copy_(piece, non_blocking=True)
            in_flight.append((k, lo, hi, ring.release(k)))
        for item in in_flight:
            _drain(host, ring, *item)


def _drain(
    host: torch.Tensor, ring: _StagingRing, k: int, lo: int, hi: int, done: torch.cuda.Event
) -> None:
    """Wait for window [lo, hi) to land in pinned buffer k, then copy it into host."""
    done.synchronize()
    host[lo:hi].copy_(ring.acquire(k)[: hi - lo])


def _upload(host: torch.Tensor, device: torch.device, ring: _StagingRing) -> torch.Tensor:
    """host (n,) uint8 (pageable, may be read-only) => a new (n,) uint8 tensor on `device`.

    Window i is copied into pinned buffer i % slots while earlier windows are in DMA. The
    current stream of `device` waits for the copies; the call returns before they finish.
    """
    out = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    with ring.session(device):
        for i, (lo, hi) in enumerate(_windows(host.numel(), ring.slot_bytes)):
            k = i % ring.slots
            slot = ring.acquire(k)[: hi - lo]
            slot.copy_(host[lo:hi])
            out[lo:hi].copy_(slot, non_blocking=True)
            ring.release(k)
    return out


def unpack(data: ByteSource, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """safetensors bytes => name -> tensor on `device` (views of one buffer there)."""
    view = memoryview(data).cast("B")
    (size,) = struct.unpack("<Q", view[:8])
    header = json.loads(bytes(view[8 : 8 + size]))
    header.pop("__metadata__", None)
    buffer = _to_device(_host_bytes(view, 8 + size), torch.device(device))
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _FROM_NAME[info["dtype"]]
        piece = buffer[begin:end]
        if begin % 16:  # not 16-byte aligned (GPU kernels load 16 bytes at a time): copy
            piece = piece.clone()
        out[name] = piece.view(dtype).reshape(info["shape"])
    return out


def _host_bytes(view: memoryview, offset: int) -> torch.Tensor:
    """view[offset:] as a (n,) uint8 CPU tensor without copying (never written to)."""
    if len(view) <= offset:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only buffers: the tensor is only ever read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8, offset=offset)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One copy of host (n,) uint8 into a fresh, aligned, writable buffer on `device`."""
    if device.type == "cpu":
        return host.clone()
    if device.type == "cuda" and host.numel():
        index = torch.cuda.current_device() if device.index is None else device.index
        return _upload(host, torch.device("cuda", index), _RING)
    return host.to(device)
