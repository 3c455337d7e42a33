"""PyTorch's fused flash-attention kernels (they return the log-sum-exp we need to merge).

CPU: `aten._scaled_dot_product_flash_attention_for_cpu`. Other devices fall back to the
reference. Same contract as service.engine.backends.reference.
"""

from __future__ import annotations

import torch

from service.engine.backends import reference

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (Hq, T|S, d) with equal head counts -> out (Hq, T, d), lse (Hq, T) fp32."""
    out, lse = _cpu_flash(q[None], k[None], v[None], 0.0, causal, attn_mask=bias, scale=scale)
    return out[0], lse[0].float()


def _expand(x: torch.Tensor, group: int) -> torch.Tensor:
    """(H, S, d) -> (H * group, S, d), query head j reading KV head j // group."""
    h, s, d = x.shape
    return x.unsqueeze(1).expand(h, group, s, d).reshape(h * group, s, d)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, T, d) over k/v (H, S, d), bottom-right causal -> out (Hq, T, d), lse (Hq, T)."""
    if q.device.type != "cpu":
        return reference.causal_attention(q, k, v, scale)
    t, s = q.shape[1], k.shape[1]
    group = q.shape[0] // k.shape[0]
    bias = None
    if 1 < t < s:
        allowed = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        bias = torch.zeros(t, s, dtype=q.dtype, device=q.device).masked_fill(
            ~allowed, float("-inf")
        )
        bias = bias[None, None]
    return _flash(q, _expand(k, group), _expand(v, group), scale, bias, causal=t == s and t > 1)


def ragged_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_lens: torch.Tensor,
    scale: float,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, T, d) over ragged keys/values (N, d) -> out (Hq, T, d), lse (Hq, T)."""
    if q.device.type != "cpu":
        return reference.ragged_attention(q, keys, values, cu_lens, scale)
    n_heads = cu_lens.numel() - 1
    group = q.shape[0] // n_heads
    lens = (cu_lens[1:] - cu_lens[:-1]).tolist()
    if len(set(lens)) == 1 and lens[0] > 0:  # uniform (uncompressed) context: one call
        k = keys.view(n_heads, lens[0], -1)
        v = values.view(n_heads, lens[0], -1)
        return _flash(q, _expand(k, group), _expand(v, group), scale, None, causal=False)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    bounds = cu_lens.tolist()
    for h in range(n_heads):
        if lens[h] == 0:
            continue
        rows, heads = slice(bounds[h], bounds[h + 1]), slice(h * group, (h + 1) * group)
        k = _expand(keys[rows].unsqueeze(0), group)
        v = _expand(values[rows].unsqueeze(0), group)
        out[heads], lse[heads] = _flash(q[heads], k, v, scale, None, causal=False)
    return out, lse
