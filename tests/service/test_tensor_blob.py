"""The fast safetensors packer/unpacker against the safetensors library, both directions."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from service.tensor_blob import pack, unpack


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
