"""CUDA backend: PyTorch's flash-attention varlen kernel, plus the Triton ragged decode.

Ragged context: every KV head is its own variable-length sequence with G query heads and
one KV head (queries (H*T, G, d), keys (N, 1, d), cu_seqlens_k = cu_lens), so nothing is
expanded or padded. Decode-sized query blocks (G*T <= 64 rows) go to the Triton
split-K kernel, which is CUDA-graph capturable; larger blocks (prefill, scoring) to flash.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from service.engine.backends import triton_ragged

VarlenKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""A varlen flash kernel with `_flash_varlen`'s signature: q (Tq, Hq, d), k/v (Tk, Hk, d),
cu_q, cu_k, max_q, max_k, causal, scale -> out (Tq, Hq, d), lse (Hq, Tq) fp32."""


def _flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Tq, Hq, d), k/v (Tk, Hk, d) -> out (Tq, Hq, d), lse (Hq, Tq) fp32."""
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
    )
    return out, lse.float()


def _cu(length: int, device: torch.device) -> torch.Tensor:
    """[0, length] int32, made on the device (a host list would stall the stream)."""
    return torch.arange(0, 2 * length, length, dtype=torch.int32, device=device)[:2]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    varlen: VarlenKernel = _flash_varlen,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, T, d) over k/v (H, S, d), bottom-right causal -> out (Hq, T, d), lse (Hq, T).

    varlen: the flash kernel (PyTorch's by default; the `flash_attn` backend passes its own).
    """
    t, s = q.shape[1], k.shape[1]
    out, lse = varlen(
        q.transpose(0, 1).contiguous(),
        k.transpose(0, 1).contiguous(),
        v.transpose(0, 1).contiguous(),
        _cu(t, q.device),
        _cu(s, q.device),
        t,
        s,
        causal=t > 1,
        scale=scale,
    )
    return out.transpose(0, 1), lse


def ragged_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_lens: torch.Tensor,
    scale: float,
    max_len: int | None = None,
    varlen: VarlenKernel = _flash_varlen,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, T, d) over ragged keys/values (N, d), cu_lens (H+1,) -> out, lse (Hq, T).

    max_len: the longest head, when the caller knows it (saves a device sync).
    varlen: the flash kernel for blocks bigger than decode-sized.
    """
    hq, t, d = q.shape
    h = cu_lens.numel() - 1
    g = hq // h
    if g * t <= triton_ragged.MAX_ROWS:
        rows = q.reshape(h, g * t, d)
        out, lse = triton_ragged.ragged_decode(
            rows, keys, values, cu_lens, scale, n_splits=_splits(keys, h)
        )
        return out.view(hq, t, d), lse.view(hq, t)
    max_k = max_len if max_len is not None else int((cu_lens[1:] - cu_lens[:-1]).max())
    qv = q.reshape(h, g, t, d).permute(0, 2, 1, 3).reshape(h * t, g, d)
    cu_q = torch.arange(h + 1, dtype=torch.int32, device=q.device) * t
    out, lse = varlen(
        qv,
        keys.unsqueeze(1),
        values.unsqueeze(1),
        cu_q,
        cu_lens,
        t,
        max_k,
        causal=False,
        scale=scale,
    )
    out = out.view(h, t, g, d).permute(0, 2, 1, 3).reshape(hq, t, d)
    lse = lse.view(g, h, t).permute(1, 0, 2).reshape(hq, t)
    return out, _empty_heads_to_neg_inf(lse, cu_lens, g)


def fused_static_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_lens: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    length: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """Context + static tail + merge in two kernels, or None when the block is too big."""
    b, hq, t, _ = q.shape
    if hq * b * t > (cu_lens.numel() - 1) * triton_ragged.MAX_ROWS:
        return None
    h = cu_lens.numel() - 1
    return triton_ragged.fused_decode(
        q, keys, values, cu_lens, tail_k, tail_v, length, scale, _splits(keys, h)
    )


def _splits(keys: torch.Tensor, h: int) -> int:
    """Split count from the average head length (static per context: no device sync)."""
    return triton_ragged.n_splits_for(max(1, keys.shape[0] // max(h, 1)))


def _empty_heads_to_neg_inf(lse: torch.Tensor, cu_lens: torch.Tensor, g: int) -> torch.Tensor:
    """flash reports lse=+inf (or garbage) for a sequence with no keys: make it -inf."""
    empty = (cu_lens[1:] == cu_lens[:-1]).repeat_interleave(g).unsqueeze(1)
    return lse.masked_fill(empty, float("-inf"))
