"""Plain-PyTorch attention: correct everywhere, the oracle every other backend is tested on.

All functions work on one sequence (no batch dim). Query heads are grouped GQA-style:
query head j reads KV head j // G.
"""

from __future__ import annotations

import torch


def _softmax_with_lse(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., k) fp32 -> (probs (..., k), lse (...)); an all -inf row gives zeros, -inf."""
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(logits - safe.unsqueeze(-1)), lse


def ragged_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_lens: torch.Tensor,
    scale: float,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a ragged per-head context (no mask: every context key precedes q).

    q: (Hq, T, d); keys, values: (N, d) head-major; cu_lens: (H+1,) int32 offsets.
    Returns out (Hq, T, d) in q's dtype and lse (Hq, T) fp32 (-inf for an empty head).
    """
    n_heads = cu_lens.numel() - 1
    hq, t, d = q.shape
    group = hq // n_heads
    out = torch.zeros(hq, t, d, dtype=torch.float32, device=q.device)
    lse = torch.full((hq, t), float("-inf"), dtype=torch.float32, device=q.device)
    bounds = cu_lens.tolist()
    for h in range(n_heads):
        start, end = bounds[h], bounds[h + 1]
        if end == start:
            continue
        qh = q[h * group : (h + 1) * group].float()  # (G, T, d)
        logits = torch.matmul(qh, keys[start:end].float().T) * scale  # (G, T, len)
        probs, lse_h = _softmax_with_lse(logits)
        out[h * group : (h + 1) * group] = torch.matmul(probs, values[start:end].float())
        lse[h * group : (h + 1) * group] = lse_h
    return out.to(q.dtype), lse


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with a bottom-right aligned causal mask.

    q: (Hq, T, d); k, v: (H, S, d) with S >= T, the last T keys belonging to the T queries.
    Returns out (Hq, T, d) in q's dtype and lse (Hq, T) fp32.
    """
    hq, t, _ = q.shape
    group = hq // k.shape[0]
    s = k.shape[1]
    kk = k.float().repeat_interleave(group, dim=0)
    vv = v.float().repeat_interleave(group, dim=0)
    logits = torch.matmul(q.float(), kk.transpose(1, 2)) * scale  # (Hq, T, S)
    rows = torch.arange(t, device=q.device).unsqueeze(1) + (s - t)
    cols = torch.arange(s, device=q.device).unsqueeze(0)
    logits = logits.masked_fill(cols > rows, float("-inf"))
    probs, lse = _softmax_with_lse(logits)
    return torch.matmul(probs, vv).to(q.dtype), lse
