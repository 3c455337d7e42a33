"""Quantized keys and values of a stored context (DESIGN.md, "Storage format").

`compression.quantization` picks how a layer's keys/values (N, d), head-major and ragged
(`cu_lens`), are stored; the resident context is always dequantized to the model dtype.

- `none`: the tensors as they are (the model dtype).
- `fp8`: float8 e4m3 codes (N, d) and one bf16 scale per (KV head, channel),
  `{keys,values}_scale` (H, d) = amax / 448 rounded up to bf16 (objects of format version
  2 carry float32 scales; both read the same). Keys have outlier channels (KIVI), so the scale
  is per channel; e4m3's own exponent absorbs the spread between tokens, so a per-token
  scale would cost 2 bytes per row for nothing. Centred (`centred=True`, format version 4):
  the mean over the head's stored rows, rounded to bf16, `{keys,values}_mean` (H, d), is
  taken out before coding and added back after (for keys SageAttention's "smoothing",
  Zhang et al. 2024, arXiv 2410.02367). e4m3's error is relative to what it codes (3
  mantissa bits), and a key channel's values sit mostly on one side of a large offset,
  so coding x - mean instead of x shrinks the error with the magnitude; the mean is still
  added back, since the stored keys share one softmax with the prefix and tail keys.
  Error: |x - x̂| <= max(2^-4 |x - m|, 2^-10 s), m the mean (0 uncentred), s the scale.
- `int4`: asymmetric 4-bit codes, two per byte (N, d/2) uint8 (low nibble first). Keys:
  one scale/zero per channel over `group_size` consecutive tokens of one head (KIVI),
  `keys_scale`/`keys_zero` (G_k, d) with G_k = sum over heads of ceil(len_h / group_size).
  Values: one per token over `min(group_size, d)` channels, `values_scale`/`values_zero`
  (N, d / that). Scales/zeros are fp16 (float32 where fp16 would overflow), the zero
  rounded down and the scale up, so every element is within scale/2 of its code.

`quantize(layer, scheme, group_size, centred)` -> name suffix -> tensor (on the layer's
device); `dequantize(tensors, cu_lens, scheme, group_size, dtype)` -> (keys, values) on the
tensors' device, no host round trip: on a GPU one Triton launch per layer
(service.engine.backends.triton_dequant) reads the codes once and writes the model dtype;
elsewhere a few vectorised torch ops per tensor (`dequantize_torch`, the reference). A
process checks the kernel's first layer per (scheme, dtype) against the torch ops and keeps
to the torch ops if it disagrees or does not build. fp8 means are added where the tensors
hold them (`stored_names`).
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from service.engine.kvcache import RaggedLayer
from service.errors import CorruptContextError

SCHEMES = ("none", "fp8", "int4")
FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0
_LEVELS = 15  # int4: codes 0..15
_FP16_LIMIT = 60000.0  # beyond this a scale or zero goes to float32


def head_of_row(cu_lens: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(N,) int64: the KV head of every row of a ragged layer."""
    heads = torch.arange(cu_lens.numel() - 1, device=cu_lens.device)
    return torch.repeat_interleave(heads, (cu_lens[1:] - cu_lens[:-1]).long(), output_size=n_rows)


def key_groups(cu_lens: torch.Tensor, n_rows: int, group_size: int) -> torch.Tensor:
    """(N,) int64: the int4 key group of every row (groups never straddle two heads)."""
    lens = (cu_lens[1:] - cu_lens[:-1]).long()
    starts = torch.cumsum((lens + group_size - 1) // group_size, 0) - (
        (lens + group_size - 1) // group_size
    )
    head = head_of_row(cu_lens, n_rows)
    local = torch.arange(n_rows, device=cu_lens.device) - cu_lens.long()[head]
    return starts[head] + local // group_size


def value_group(group_size: int, d: int) -> int:
    """Channels per int4 value group: group_size when it divides d, else the whole row."""
    g = min(group_size, d)
    return g if d % g == 0 else d


# -- quantize ------------------------------------------------------------------------------


def quantize(
    layer: RaggedLayer, scheme: str, group_size: int, centred: bool = True
) -> dict[str, torch.Tensor]:
    """The stored tensors of one layer's keys/values: suffix ("keys", "keys_scale", ...).
    `centred`: fp8 only, the per-(head, channel) mean taken out (format version 4)."""
    if scheme == "none":
        return {"keys": layer.keys, "values": layer.values}
    n = layer.keys.shape[0]
    if scheme == "fp8":
        head = head_of_row(layer.cu_lens, n)
        lens = (layer.cu_lens[1:] - layer.cu_lens[:-1]).tolist()  # heads' rows are contiguous
        return {
            **_fp8(layer.keys, head, lens, "keys", centred),
            **_fp8(layer.values, head, lens, "values", centred),
        }
    if scheme == "int4":
        return {**_int4_keys(layer, group_size), **_int4_values(layer.values, group_size)}
    raise ValueError(f"unknown quantization {scheme!r}; use {SCHEMES}")


def _per_head(x: torch.Tensor, lens: list[int], reduce: str) -> torch.Tensor:
    """x (N, d) float32, rows grouped by head (`lens` rows each) -> (H, d): the `reduce`
    ("mean" or "amax" of |x|) of each head's rows, 0 for a head without rows. Plain
    reductions over contiguous slices: no atomics into H x d cells (index_add_ and
    scatter_reduce_ serialise there on a GPU)."""
    out = x.new_zeros(len(lens), x.shape[1])
    for h, part in enumerate(x.split_with_sizes(lens)):
        if part.shape[0]:
            out[h] = part.mean(0) if reduce == "mean" else part.abs().amax(0)
    return out


def _fp8(
    x: torch.Tensor, head: torch.Tensor, lens: list[int], field: str, centred: bool
) -> dict[str, torch.Tensor]:
    """x (N, d) -> e4m3 codes (N, d) and a bf16 scale per (head, channel) (H, d); centred:
    also the bf16 mean per (head, channel) (H, d) the codes are taken from. `head` (N,)
    the head of every row, `lens` the rows of each head (contiguous, in head order)."""
    xf = x.float()
    out = {}
    if centred:
        mean = _per_head(xf, lens, "mean").to(torch.bfloat16)
        xf = xf - mean.float()[head]
        out[f"{field}_mean"] = mean
    amax = _per_head(xf, lens, "amax")
    scale = _round_up((amax / _FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny), torch.bfloat16)
    codes = (xf / scale.float()[head]).clamp(-_FP8_MAX, _FP8_MAX).to(FP8)
    return {field: codes, f"{field}_scale": scale, **out}


def _int4_keys(layer: RaggedLayer, group_size: int) -> dict[str, torch.Tensor]:
    """Keys (N, d): codes (N, d/2) and a scale/zero per (token group of a head, channel)."""
    x = layer.keys.float()
    n, d = x.shape
    groups = key_groups(layer.cu_lens, n, group_size)
    n_groups = int(groups[-1]) + 1 if n else 0
    index = groups[:, None].expand(-1, d)
    lo = torch.full((n_groups, d), torch.inf, device=x.device).scatter_reduce_(0, index, x, "amin")
    hi = torch.full((n_groups, d), -torch.inf, device=x.device).scatter_reduce_(0, index, x, "amax")
    zero, scale = _affine(lo, hi)
    codes = _codes(x, zero.float()[groups], scale.float()[groups])
    return {"keys": codes, "keys_scale": scale, "keys_zero": zero}


def _int4_values(values: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Values (N, d): codes (N, d/2) and a scale/zero per (token, channel group) (N, d/g)."""
    n, d = values.shape
    g = value_group(group_size, d)
    x = values.float().view(n, d // g, g)
    zero, scale = _affine(x.amin(-1), x.amax(-1))
    codes = _codes(x, zero.float()[..., None], scale.float()[..., None])
    return {"values": codes.view(n, d // 2), "values_scale": scale, "values_zero": zero}


def _affine(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero (rounded down) and scale (rounded up) of groups spanning [lo, hi]: fp16 when
    it fits, else float32."""
    compact = _fits_fp16(lo) and _fits_fp16(hi - lo)
    zero = _round_down_fp16(lo) if compact else lo
    scale = ((hi - zero.float()) / _LEVELS).clamp_min(2.0**-24)
    return zero, _round_up(scale, torch.float16) if compact else scale


def _codes(x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round((x - zero) / scale) in 0..15, two per byte along the last dim (low nibble first)."""
    codes = torch.round((x - zero) / scale).clamp_(0, _LEVELS).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _fits_fp16(x: torch.Tensor) -> bool:
    return not x.numel() or float(x.abs().max()) < _FP16_LIMIT


def _round_down_fp16(x: torch.Tensor) -> torch.Tensor:
    """The largest fp16 <= x (x float32, finite, |x| < 65504)."""
    h = x.half()
    bits = h.view(torch.int16)
    below_zero = torch.full_like(bits, -32767)  # 0x8001: the negative fp16 nearest zero
    smaller = torch.where(h > 0, bits - 1, torch.where(h < 0, bits + 1, below_zero))
    return torch.where(h.float() > x, smaller.view(torch.float16), h)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest `dtype` (fp16 or bf16) >= x (x float32, positive, finite in `dtype`)."""
    h = x.to(dtype)
    return torch.where(h.float() < x, (h.view(torch.int16) + 1).view(dtype), h)


# -- dequantize ----------------------------------------------------------------------------


def dequantize(
    tensors: dict[str, torch.Tensor],
    cu_lens: torch.Tensor,
    scheme: str,
    group_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored tensors of one layer (suffix -> tensor, on the target device) -> keys,
    values (N, d) in `dtype`, computed where the tensors are (fp8: `{keys,values}_mean`
    added where present, i.e. centred). On a CUDA device one Triton launch per layer
    (`backends.triton_dequant`) where it takes the width; else `dequantize_torch`."""
    if scheme == "none":
        return tensors["keys"].to(dtype), tensors["values"].to(dtype)
    d = tensors["values"].shape[1] * (2 if scheme == "int4" else 1)
    kernels = _kernels(tensors["keys"].device, d)
    if kernels is not None:
        g = value_group(group_size, d)
        try:
            keys, values = kernels.dequantize(tensors, cu_lens, scheme, group_size, g, dtype)
            if (scheme, dtype) not in _KERNEL_CHECKED:
                _check_kernel((keys, values), tensors, cu_lens, scheme, group_size, dtype)
            return keys, values
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a kernel that does not build or compute right here
            _KERNEL_FAILURES.append(repr(exc))
            _log.warning("dequantization kernel not used, torch ops instead: %r", exc)
    return dequantize_torch(tensors, cu_lens, scheme, group_size, dtype)


_KERNEL_FAILURES: list[str] = []  # once the kernel fails, the torch ops serve the process
_KERNEL_CHECKED: set[tuple[str, torch.dtype]] = set()
_log = logging.getLogger(__name__)


def _check_kernel(
    got: tuple[torch.Tensor, torch.Tensor],
    tensors: dict[str, torch.Tensor],
    cu_lens: torch.Tensor,
    scheme: str,
    group_size: int,
    dtype: torch.dtype,
) -> None:
    """The first layer a process dequantizes with the kernel per (scheme, dtype) is also
    dequantized by the torch ops: RuntimeError unless they agree to one unit in the last
    place of `dtype` (a kernel built wrong on this device never serves a context)."""
    want = dequantize_torch(tensors, cu_lens, scheme, group_size, dtype)
    eps = torch.finfo(dtype).eps
    for a, b in zip(got, want, strict=True):
        if not torch.allclose(a.float(), b.float(), rtol=eps, atol=0.0, equal_nan=True):
            raise RuntimeError(f"the {scheme} kernel disagrees with the torch ops")
    _KERNEL_CHECKED.add((scheme, dtype))


def _kernels(device: torch.device, d: int) -> ModuleType | None:
    """The Triton dequantization module for rows of `d` channels on `device`, or None."""
    if device.type != "cuda" or _KERNEL_FAILURES:
        return None
    try:
        from service.engine.backends import triton_dequant
    except ImportError:  # no triton
        return None
    return triton_dequant if triton_dequant.supported(d) else None


def dequantize_torch(
    tensors: dict[str, torch.Tensor],
    cu_lens: torch.Tensor,
    scheme: str,
    group_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dequantize` in vectorised torch ops (the CPU path and the kernels' reference)."""
    if scheme == "none":
        return tensors["keys"].to(dtype), tensors["values"].to(dtype)
    if scheme == "fp8":
        lens = (cu_lens[1:] - cu_lens[:-1]).tolist()  # heads' rows are contiguous
        return tuple(  # type: ignore[return-value]
            _fp8_values(tensors, f, lens).to(dtype) for f in ("keys", "values")
        )
    if scheme == "int4":
        codes = tensors["keys"]
        n = codes.shape[0]
        groups = key_groups(cu_lens, n, group_size)
        keys = _unpack_int4(codes) * tensors["keys_scale"].float()[groups]
        keys = keys.add_(tensors["keys_zero"].float()[groups]).to(dtype)
        values = _unpack_int4(tensors["values"])
        d = values.shape[1]
        g = value_group(group_size, d)
        values = values.view(n, d // g, g) * tensors["values_scale"].float()[..., None]
        values = values.add_(tensors["values_zero"].float()[..., None]).reshape(n, d).to(dtype)
        return keys, values
    raise ValueError(f"unknown quantization {scheme!r}; use {SCHEMES}")


def _fp8_values(tensors: dict[str, torch.Tensor], field: str, lens: list[int]) -> torch.Tensor:
    """codes * scale (+ mean) in float32, in place on each head's rows (`lens` rows each, in
    head order): one float32 copy, no per-row gather of the scales."""
    x = tensors[field].to(torch.float32, copy=True)  # written in place below
    scale, mean = tensors[f"{field}_scale"].float(), tensors.get(f"{field}_mean")
    for h, rows in enumerate(x.split_with_sizes(lens)):
        rows.mul_(scale[h])
        if mean is not None:
            rows.add_(mean[h].float())
    return x


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(R, c/2) uint8 -> (R, c) float32 codes 0..15."""
    rows, half = packed.shape  # explicit: a layer may keep no rows (reshape(0, -1) fails)
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(rows, 2 * half).float()


def check_shapes(
    stored: dict[str, torch.Tensor], bounds: list[int], scheme: str, group_size: int, layer: int
) -> None:
    """CorruptContextError unless one layer's stored tensors (`stored_names`) fit its row
    offsets `bounds` (cu_lens as host ints) and each other (checked before any gather: an
    index out of range on a GPU is fatal to the process)."""
    lens = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    values = stored["values"]
    width = values.shape[-1]  # int4: two codes per byte
    n, d = (bounds[-1] if bounds else -1), width * (2 if scheme == "int4" else 1)
    want = {"keys": (n, width), "values": (n, width)}
    if scheme == "fp8":
        want |= {"keys_scale": (len(lens), d), "values_scale": (len(lens), d)}
        want |= {f"{f}_mean": (len(lens), d) for f in ("keys", "values") if f"{f}_mean" in stored}
    if scheme == "int4":
        g, n_groups = value_group(group_size, d), sum(-(-x // group_size) for x in lens)
        want |= {"keys_scale": (n_groups, d), "keys_zero": (n_groups, d)}
        want |= {"values_scale": (n, d // g), "values_zero": (n, d // g)}
    code = {"none": None, "fp8": FP8, "int4": torch.uint8}[scheme]
    broken = [name for name, shape in want.items() if tuple(stored[name].shape) != shape]
    broken += [f"{f} dtype" for f in ("keys", "values") if code and stored[f].dtype != code]
    if bounds[:1] != [0] or min(lens, default=0) < 0:
        broken.append("cu_lens")
    if broken:
        raise CorruptContextError(
            f"stored context layer {layer}: {', '.join(broken)} do not fit the stored "
            f"{scheme} layout (cu_lens says {n} rows of {d} channels)"
        )


def stored_names(scheme: str, centred: bool = False) -> tuple[str, ...]:
    """The name suffixes one layer's keys/values are stored under (centred: fp8 of format
    version 4)."""
    if scheme == "none":
        return ("keys", "values")
    if scheme == "fp8":
        means = ("keys_mean", "values_mean") if centred else ()
        return ("keys", "keys_scale", "values", "values_scale", *means)
    return ("keys", "keys_scale", "keys_zero", "values", "values_scale", "values_zero")
