"""The dequantization kernels (service.engine.backends.triton_dequant) against the torch
path they replace on the GPU (`quantization.dequantize_torch`), on CPU under the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU). The compiled kernels
are checked on the GPU in test_quantization.py."""

from __future__ import annotations

import os

import pytest
import torch

from service.engine import quantization
from service.engine.kvcache import RaggedLayer

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter tests (the GPU runs the compiled kernels)", allow_module_level=True)
triton_dequant = pytest.importorskip("service.engine.backends.triton_dequant")

LENS = [0, 70, 3, 0, 130, 64]  # empty heads first, between and uneven lengths


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    """float32: the same arithmetic, the same bits; bf16: one unit in the last place (the
    interpreter's cast to bf16 truncates where the GPU's rounds to nearest)."""
    return {"rtol": 2**-20 if dtype == torch.float32 else 2**-7, "atol": 0.0}


def _layer(lens: list[int], d: int, seed: int, offset: float = 3.0) -> RaggedLayer:
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    channel = torch.logspace(-2, 1.5, d)[torch.randperm(d, generator=g)]
    keys = torch.randn(n, d, generator=g) * channel + offset
    values = torch.randn(n, d, generator=g) * 0.5
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.zeros(n, dtype=torch.int32)
    return RaggedLayer(keys, values, cu, torch.rand(n, generator=g), positions)


def _both(stored, cu, scheme, group_size, dtype):
    d = stored["values"].shape[1] * (2 if scheme == "int4" else 1)
    g = quantization.value_group(group_size, d)
    got = triton_dequant.dequantize(stored, cu, scheme, group_size, g, dtype)
    want = quantization.dequantize_torch(stored, cu, scheme, group_size, dtype)
    return got, want


@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_kernel_matches_the_torch_path(centred, dtype):
    layer = _layer(LENS, 64, seed=1)
    stored = quantization.quantize(layer, "fp8", 64, centred=centred)
    for got, want in zip(*_both(stored, layer.cu_lens, "fp8", 64, dtype), strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **_tolerance(dtype))


def test_fp8_kernel_reads_format_2_float32_scales():
    layer = _layer(LENS, 32, seed=2)
    stored = quantization.quantize(layer, "fp8", 64, centred=False)
    stored = {k: v.float() if k.endswith("_scale") else v for k, v in stored.items()}
    for got, want in zip(*_both(stored, layer.cu_lens, "fp8", 64, torch.float32), strict=True):
        torch.testing.assert_close(got, want, rtol=2**-20, atol=0.0)


def test_fp8_kernel_decodes_every_e4m3_code():
    """All 256 bit patterns (subnormals, both zeros, NaN) as torch converts them."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16)
    stored = {
        f: codes.view(quantization.FP8) if f in ("keys", "values") else torch.ones(1, 16)
        for f in quantization.stored_names("fp8")
    }
    cu = torch.tensor([0, 16], dtype=torch.int32)
    keys, values = triton_dequant.dequantize(stored, cu, "fp8", 64, 16, torch.float32)
    want = codes.view(quantization.FP8).float()
    torch.testing.assert_close(keys, want, equal_nan=True, rtol=0.0, atol=0.0)
    torch.testing.assert_close(values, want, equal_nan=True, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("group_size", [8, 32, 48, 64])  # 48: values grouped by the whole row
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_the_torch_path(group_size, dtype):
    layer = _layer(LENS, 64, seed=group_size)
    stored = quantization.quantize(layer, "int4", group_size)
    for got, want in zip(*_both(stored, layer.cu_lens, "int4", group_size, dtype), strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **_tolerance(dtype))


def test_int4_kernel_reads_float32_scales_and_zeros():
    """Beyond fp16's range the scales and zeros are float32."""
    layer = _layer([50, 0, 20], 32, seed=3, offset=1e5)
    stored = quantization.quantize(layer, "int4", 16)
    assert stored["keys_zero"].dtype == torch.float32
    for got, want in zip(*_both(stored, layer.cu_lens, "int4", 16, torch.float32), strict=True):
        torch.testing.assert_close(got, want, rtol=2**-20, atol=0.0)


def test_an_empty_layer_launches_nothing():
    layer = _layer([0, 0], 32, seed=4)
    for scheme in ("fp8", "int4"):
        stored = quantization.quantize(layer, scheme, 32)
        keys, values = _both(stored, layer.cu_lens, scheme, 32, torch.bfloat16)[0]
        assert keys.shape == values.shape == (0, 32)


def test_widths_the_kernels_take():
    assert [triton_dequant.supported(d) for d in (16, 64, 128, 96, 8)] == [1, 1, 1, 0, 0]
