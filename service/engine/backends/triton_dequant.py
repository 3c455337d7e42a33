# mypy: disable-error-code="untyped-decorator,no-untyped-def,no-any-return"
"""Triton kernels that dequantize one stored layer on the device (service.engine.quantization).

One launch per layer: programs over (block of rows, field), field 0 the keys and 1 the values,
read the codes and their scales (fp8: and means; int4: and zeros) and write the model dtype:
one read of the codes, one write of the result, no float32 intermediate in memory. A row's
KV head, and an int4 key row's group, come from `cu_lens` (H+1 offsets) inside the kernel, so
no per-row index tensor is built and nothing waits for the host. The torch code in
`quantization` stays the reference and the CPU path; its arithmetic is repeated here (code x
scale, then + mean or zero, in float32, then the cast).

fp8 codes are read as bytes and decoded by their bits into float32 bits (e4m3fn: bias 7,
subnormals, S.1111.111 NaN), which is exact and runs the same under the interpreter.
Tested on CPU under TRITON_INTERPRET=1 against the torch path
(tests/service/test_triton_dequant_cpu.py) and compiled on the GPU
(tests/service/test_quantization.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 32  # rows per program


def supported(d: int) -> bool:
    """Whether the kernels take rows of `d` channels (a power of two, >= 16)."""
    return d >= 16 and d & (d - 1) == 0


@triton.jit
def _heads(rows, CU, H: tl.constexpr):
    """The KV head of each row: how many heads start at or before it (empty heads skip)."""
    head = tl.zeros_like(rows)
    for h in tl.static_range(1, H):
        head += (rows >= tl.load(CU + h)).to(tl.int32)
    return head


@triton.jit
def _e4m3(bits):
    """float32 of e4m3fn codes given as uint8 bits."""
    b = bits.to(tl.int32)
    exponent = (b >> 3) & 15
    mantissa = b & 7
    # normal: (1 + m/8) 2^(e-7), i.e. the float32 with exponent field e + 120, mantissa m << 20
    normal = ((exponent + 120) << 23 | mantissa << 20).to(tl.float32, bitcast=True)
    x = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)  # m 2^-9
    x = tl.where((b & 127) == 127, float("nan"), x)
    return tl.where(b >= 128, -x, x)


@triton.jit
def _fp8_field(CODES, SCALE, MEAN, OUT, rows, head, live, D: tl.constexpr, HAS_MEAN: tl.constexpr):
    cols = tl.arange(0, D)
    ok = live[:, None]
    at = rows[:, None].to(tl.int64) * D + cols[None, :]
    per_head = head[:, None] * D + cols[None, :]
    x = _e4m3(tl.load(CODES + at, mask=ok, other=0))
    x = x * tl.load(SCALE + per_head, mask=ok, other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = x + tl.load(MEAN + per_head, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + at, x.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _fp8_kernel(
    KC, KS, KM, VC, VS, VM, CU, KOUT, VOUT, N,
    H: tl.constexpr, D: tl.constexpr, HAS_MEAN: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    live = rows < N
    head = _heads(rows, CU, H)
    if tl.program_id(1) == 0:
        _fp8_field(KC, KS, KM, KOUT, rows, head, live, D, HAS_MEAN)
    else:
        _fp8_field(VC, VS, VM, VOUT, rows, head, live, D, HAS_MEAN)


@triton.jit
def _nibbles(CODES, rows, ok, D: tl.constexpr):
    """(rows, D) float32 codes 0..15 of rows packed two per byte (low nibble first)."""
    cols = tl.arange(0, D)
    packed = tl.load(CODES + rows[:, None].to(tl.int64) * (D // 2) + cols[None, :] // 2, mask=ok)
    return ((packed.to(tl.int32) >> ((cols[None, :] % 2) * 4)) & 15).to(tl.float32)


@triton.jit
def _int4_keys(
    CODES, SCALE, ZERO, OUT, CU, rows, head, live, GROUP, H: tl.constexpr, D: tl.constexpr
):
    """Keys: a scale/zero per (group of GROUP rows of one head, channel)."""
    first = tl.zeros_like(rows)  # the head's first group
    start = tl.zeros_like(rows)  # the head's first row
    groups = 0
    for h in tl.static_range(H):
        lo = tl.load(CU + h)
        first = tl.where(head == h, groups, first)
        start = tl.where(head == h, lo, start)
        groups += (tl.load(CU + h + 1) - lo + GROUP - 1) // GROUP
    group = first + (rows - start) // GROUP
    cols = tl.arange(0, D)
    ok = live[:, None]
    at = group[:, None].to(tl.int64) * D + cols[None, :]
    x = _nibbles(CODES, rows, ok, D) * tl.load(SCALE + at, mask=ok, other=0.0).to(tl.float32)
    x = x + tl.load(ZERO + at, mask=ok, other=0.0).to(tl.float32)
    _store(OUT, rows, x, ok, D)


@triton.jit
def _store(OUT, rows, x, ok, D: tl.constexpr):
    at = rows[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]
    tl.store(OUT + at, x.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _int4_values(CODES, SCALE, ZERO, OUT, rows, live, D: tl.constexpr, G: tl.constexpr):
    """Values: a scale/zero per (row, group of G channels)."""
    cols = tl.arange(0, D)
    ok = live[:, None]
    at = rows[:, None].to(tl.int64) * (D // G) + cols[None, :] // G
    x = _nibbles(CODES, rows, ok, D) * tl.load(SCALE + at, mask=ok, other=0.0).to(tl.float32)
    x = x + tl.load(ZERO + at, mask=ok, other=0.0).to(tl.float32)
    _store(OUT, rows, x, ok, D)


@triton.jit
def _int4_kernel(
    KC, KS, KZ, VC, VS, VZ, CU, KOUT, VOUT, N, GROUP,
    H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    live = rows < N
    if tl.program_id(1) == 0:
        head = _heads(rows, CU, H)
        _int4_keys(KC, KS, KZ, KOUT, CU, rows, head, live, GROUP, H, D)
    else:
        _int4_values(VC, VS, VZ, VOUT, rows, live, D, G)


def dequantize(
    tensors: dict[str, torch.Tensor],
    cu_lens: torch.Tensor,
    scheme: str,
    group_size: int,
    value_group: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's stored tensors (`quantization.stored_names`, checked by
    `quantization.check_shapes`) -> keys, values (N, d) in `dtype`, in one launch.
    cu_lens (H+1,) int32 on the tensors' device; value_group: int4 channels per value scale."""
    codes = tensors["keys"]
    n = codes.shape[0]
    d = codes.shape[1] * (2 if scheme == "int4" else 1)
    keys = codes.new_empty((n, d), dtype=dtype)
    values = codes.new_empty((n, d), dtype=dtype)
    if n == 0:
        return keys, values
    grid = (triton.cdiv(n, BLOCK_ROWS), 2)
    cu, h = cu_lens.to(torch.int32), cu_lens.numel() - 1
    if scheme == "fp8":
        k_scale, v_scale = tensors["keys_scale"], tensors["values_scale"]
        k_mean, v_mean = tensors.get("keys_mean"), tensors.get("values_mean")
        _fp8_kernel[grid](
            codes.view(torch.uint8), k_scale, k_scale if k_mean is None else k_mean,
            tensors["values"].view(torch.uint8), v_scale, v_scale if v_mean is None else v_mean,
            cu, keys, values, n, H=h, D=d, HAS_MEAN=k_mean is not None, BLOCK_ROWS=BLOCK_ROWS,
        )  # fmt: skip
    elif scheme == "int4":
        _int4_kernel[grid](
            codes, tensors["keys_scale"], tensors["keys_zero"],
            tensors["values"], tensors["values_scale"], tensors["values_zero"],
            cu, keys, values, n, group_size, H=h, D=d, G=value_group, BLOCK_ROWS=BLOCK_ROWS,
        )  # fmt: skip
    else:
        raise ValueError(f"no dequantization kernel for {scheme!r}")
    return keys, values
