"""Fast safetensors packing and unpacking for large KV objects.

Same bytes on disk as the `safetensors` library writes (8-byte little-endian header size,
a JSON header with dtype/shape/data_offsets and `__metadata__`, padded with spaces to 8
bytes, then the tensor data back to back), but moved in one piece: on a GPU all tensors
are gathered into one device buffer and copied to the host once, and unpacking copies the
whole data region to the device once and slices views out of it (tensors whose offset is
not 16-byte aligned are copied instead: vectorised GPU kernels need that alignment). The
`safetensors` library stays the reference reader/writer (tests check both directions).
"""

from __future__ import annotations

import json
import struct
import warnings

import torch

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8", torch.int16: "I16",
}
_FROM_NAME = {name: dtype for dtype, name in _DTYPES.items()}


def pack(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """name -> tensor (any devices) => safetensors bytes.

    Largest tensors first: KV blocks (N * d * 2 bytes, d a multiple of 8) then start at
    16-byte aligned offsets, which fused GPU kernels need for their vector loads.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].numel() * tensors[n].element_size(), n))
    header: dict[str, object] = {"__metadata__": metadata}
    offset, chunks = 0, []
    for name in order:
        t = tensors[name].contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        chunks.append(t.reshape(-1).view(torch.uint8))
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out = bytearray(8 + len(raw) + offset)
    out[:8] = struct.pack("<Q", len(raw))
    out[8 : 8 + len(raw)] = raw
    if offset:
        _copy_into(torch.frombuffer(out, dtype=torch.uint8)[8 + len(raw) :], chunks)
    return bytes(out)


def _copy_into(host: torch.Tensor, chunks: list[torch.Tensor]) -> None:
    """Fill the host byte view: device chunks are gathered there and copied once."""
    gpu = [c for c in chunks if c.device.type != "cpu"]
    if gpu:
        host.copy_(torch.cat([c.to(gpu[0].device) for c in chunks]))
        return
    offset = 0
    for c in chunks:
        host[offset : offset + c.numel()].copy_(c)
        offset += c.numel()


def unpack(data: bytes, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """safetensors bytes => name -> tensor on `device` (views of one buffer there)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    with warnings.catch_warnings():  # read-only bytes: the views are never written
        warnings.simplefilter("ignore", UserWarning)
        host = torch.frombuffer(memoryview(data), dtype=torch.uint8, offset=8 + size) \
            if len(data) > 8 + size else torch.empty(0, dtype=torch.uint8)
    # one copy into a fresh (aligned, writable) buffer on the target device
    buffer = host.to(device) if torch.device(device).type != "cpu" else host.clone()
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _FROM_NAME[info["dtype"]]
        piece = buffer[begin:end]
        if begin % 16:  # not 16-byte aligned (GPU kernels load 16 bytes at a time): copy
            piece = piece.clone()
        out[name] = piece.view(dtype).reshape(info["shape"])
    return out
