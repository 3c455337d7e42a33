"""The fast safetensors packer/unpacker against the safetensors library, both directions."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from service.engine.tensor_blob import (
    _download,
    _gather,
    _host_bytes,
    _new_bytes,
    _pieces,
    _Span,
    _StagingRing,
    _upload,
    _windows,
    pack,
    unpack,
)


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a.keys": torch.randn(37, 16).to(torch.bfloat16),
        "a.cu": torch.tensor([0, 5, 37], dtype=torch.int32),
        "b.scores": torch.rand(37),
        "b.half": torch.randn(3, 5).half(),
        "ids": torch.arange(11, dtype=torch.int64),
        "empty": torch.zeros(0, 16, dtype=torch.bfloat16),
    }


def test_packed_bytes_are_read_by_safetensors(tmp_path):
    tensors = _tensors()
    blob = pack(tensors, {"format_version": "1", "model": "m"})
    back = load(blob)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    (tmp_path / "x.safetensors").write_bytes(blob)
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format_version": "1", "model": "m"}


@pytest.mark.parametrize("metadata", [None, {"k": "v"}])
def test_safetensors_bytes_are_read_by_unpack(metadata):
    tensors = _tensors()
    back = unpack(save(tensors, metadata=metadata))
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_unpacked_tensors_are_16_byte_aligned():
    tensors = {
        "cu": torch.arange(9, dtype=torch.int32),  # 36 bytes: would misalign what follows
        "keys": torch.randn(50, 64).to(torch.bfloat16),
        "scores": torch.rand(7),
    }
    for blob in (pack(tensors, {}), save(tensors)):
        for t in unpack(blob).values():
            assert t.data_ptr() % 16 == 0


# -- the staging pipeline, run on the CPU through a ring without CUDA -------------------------


class _FakeEvent:
    """Stands for a CUDA event: 'in flight' until synchronized."""

    def __init__(self, ring: _CpuRing) -> None:
        self.ring = ring
        self.done = False
        ring.in_flight += 1
        ring.most_in_flight = max(ring.most_in_flight, ring.in_flight)

    def synchronize(self) -> None:
        if not self.done:
            self.done = True
            self.ring.in_flight -= 1


class _CpuRing(_StagingRing):
    """The staging ring with synchronous copies: counts windows in flight instead of DMA."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        super().__init__(slots, slot_bytes)
        self.in_flight = 0
        self.most_in_flight = 0

    @contextlib.contextmanager
    def session(self, device):
        yield

    def release(self, k):
        event = _FakeEvent(self)
        self._events[k] = event
        return event

    def _allocate(self):
        return torch.full((self.slot_bytes,), 0xAB, dtype=torch.uint8)  # garbage, not zeros


def _random_spans(sizes: list[int]) -> list[_Span]:
    gen = torch.Generator().manual_seed(len(sizes))
    spans, start = [], 0
    for size in sizes:
        spans.append(_Span(start, torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8)))
        start += size
    return spans


@pytest.mark.parametrize("slots,slot_bytes", [(1, 5), (2, 7), (3, 64), (4, 10_000)])
def test_download_fills_every_window_through_the_ring(slots, slot_bytes):
    spans = _random_spans([100, 0, 13, 1, 64, 7, 0, 250, 3])
    host = torch.empty(sum(s.data.numel() for s in spans), dtype=torch.uint8)
    ring = _CpuRing(slots, slot_bytes)
    _download(host, spans, torch.device("cpu"), ring)
    assert torch.equal(host, torch.cat([s.data for s in spans]))
    assert ring.in_flight == 0 and ring.most_in_flight <= slots


@pytest.mark.parametrize("slots,slot_bytes", [(1, 3), (2, 64), (4, 1000), (3, 4096)])
def test_upload_copies_every_window_through_the_ring(slots, slot_bytes):
    data = os.urandom(1001)
    ring = _CpuRing(slots, slot_bytes)
    out = _upload(_host_bytes(memoryview(data), 0), torch.device("cpu"), ring)
    assert bytes(out.numpy()) == data
    assert ring.most_in_flight <= slots


def test_a_slot_is_reused_only_after_its_transfer_finished():
    ring = _CpuRing(2, 8)
    _upload(_host_bytes(memoryview(os.urandom(40)), 0), torch.device("cpu"), ring)
    assert ring.in_flight == 2  # an upload returns with its last windows still "in flight"
    _upload(_host_bytes(memoryview(os.urandom(40)), 0), torch.device("cpu"), ring)
    assert ring.in_flight == 2 and ring.most_in_flight == 2  # ...the next call waited for them


def test_gather_refuses_spans_that_do_not_tile_the_region():
    with pytest.raises(ValueError):
        _gather(torch.empty(10, dtype=torch.uint8), _random_spans([4, 5]))


def test_windows_and_pieces_cover_the_region_exactly():
    spans = _random_spans([5, 0, 9, 2])
    covered = []
    for lo, hi in _windows(16, 6):
        for at, piece in _pieces(spans, lo, hi):
            assert at >= 0 and at + piece.numel() <= hi - lo
            covered.append(piece)
    assert torch.equal(torch.cat(covered), torch.cat([s.data for s in spans]))


# -- byte identity with the previous packer, and the buffers unpack accepts ---------------------


def _reference_pack(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The packer as it was before the staging ring (bytearray + one copy per tensor)."""
    order = sorted(tensors, key=lambda n: (-tensors[n].numel() * tensors[n].element_size(), n))
    header: dict[str, object] = {"__metadata__": metadata}
    offset, chunks = 0, []
    for name in order:
        t = tensors[name].contiguous()
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": {torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
                      torch.float16: "F16", torch.int64: "I64"}[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }  # fmt: skip
        chunks.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def test_pack_is_byte_identical_to_the_previous_format():
    tensors = _tensors()
    tensors["big"] = torch.randn(300, 129).to(torch.bfloat16)  # odd sizes, many pieces
    tensors["cu"] = torch.arange(7, dtype=torch.int32)
    blob = pack(tensors, {"format_version": "1"})
    assert type(blob) is bytes
    assert blob == _reference_pack(tensors, {"format_version": "1"})


def test_new_bytes_is_a_fresh_writable_bytes_object():
    out, view = _new_bytes(1000)
    view.copy_(torch.arange(1000) % 251)
    assert type(out) is bytes and out == bytes(i % 251 for i in range(1000))
    with pytest.raises(ValueError):
        _new_bytes(0)


def test_unpack_reads_any_bytes_like_source(tmp_path):
    tensors = _tensors()
    blob = pack(tensors, {})
    path = tmp_path / "blob"
    path.write_bytes(blob)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        for source in (bytearray(blob), memoryview(blob), view):
            back = unpack(source)
            for name, t in tensors.items():
                assert torch.equal(back[name], t)
            del back
        view.release()
