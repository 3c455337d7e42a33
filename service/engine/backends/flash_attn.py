"""`flash_attn` backend: the `cuda` backend's layout with the flash-attn package's kernel.

Registered only when `flash_attn` (Dao-AILab's FlashAttention-2 package, which the GPU
image installs) imports on a CUDA machine. The ragged context is passed exactly as in the
`cuda` backend: every KV head its own variable-length sequence (cu_seqlens_k = cu_lens) with
its G query heads, so nothing is expanded or padded; decode-sized blocks still go to the
Triton split-K kernel. flash-attn's causal mask is bottom-right aligned (since 2.1), which
is the mask the tail needs.
"""

from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func

from service.engine.backends import cuda


def _varlen(
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
    """q (Tq, Hq, d), k/v (Tk, Hk, d) -> out (Tq, Hq, d), lse (Hq, Tq) fp32.

    Every caller here gives all sequences the same query length (max_q), so the padded
    (batch, Hq, max_q) lse of older flash-attn releases flattens to the same (Hq, Tq).
    """
    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0,
        softmax_scale=scale, causal=causal, return_attn_probs=True,
    )  # fmt: skip
    if lse.dim() == 3:
        lse = lse[:, :, :max_q].permute(1, 0, 2).reshape(lse.shape[1], -1)
    return out, lse.float()


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, T, d) over k/v (H, S, d), bottom-right causal -> out (Hq, T, d), lse (Hq, T)."""
    return cuda.causal_attention(q, k, v, scale, varlen=_varlen)


def ragged_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_lens: torch.Tensor,
    scale: float,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, T, d) over ragged keys/values (N, d), cu_lens (H+1,) -> out, lse (Hq, T)."""
    return cuda.ragged_attention(q, keys, values, cu_lens, scale, max_len, varlen=_varlen)
