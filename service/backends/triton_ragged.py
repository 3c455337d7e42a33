"""Triton flash-decoding over the ragged compressed context.

Each (sequence, split) program attends R query rows (the G query heads of one KV head,
times the few query tokens of a decode step) to one slice of that KV head's kept keys,
with an online softmax; a second step merges the splits by their log-sum-exp. Lengths are
read from `cu_lens` on the device, so the launch is static and CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 64


@triton.jit
def _partial_kernel(
    Q, K, V, CU, O, L, scale, R,
    stride_qs, stride_qr, stride_os, stride_op, stride_or, stride_ls, stride_lp,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    split = tl.program_id(1)
    bounds = tl.load(CU + seq + tl.arange(0, 2))  # [start, end]
    start = tl.min(bounds, axis=0)
    length = tl.max(bounds, axis=0) - start
    per = tl.cdiv(tl.cdiv(length, N_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per
    hi = tl.minimum(lo + per, length)
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D)
    q = tl.load(Q + seq * stride_qs + rows[:, None] * stride_qr + cols[None, :],
                mask=rows[:, None] < R, other=0.0)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    n0 = lo
    while n0 < hi:  # a while loop: dynamic bounds, also under TRITON_INTERPRET
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < hi
        k = tl.load(K + (start + offs)[:, None] * D + cols[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, 1)
        v = tl.load(V + (start + offs)[:, None] * D + cols[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
        n0 += BLOCK_N
    safe = tl.where(s_sum > 0, s_sum, 1.0)
    out = acc / safe[:, None]
    lse = tl.where(s_sum > 0, m + tl.log(safe), float("-inf"))
    o_ptr = O + seq * stride_os + split * stride_op + rows[:, None] * stride_or + cols[None, :]
    tl.store(o_ptr, out, mask=rows[:, None] < R)
    tl.store(L + seq * stride_ls + split * stride_lp + rows, lse, mask=rows < R)


def n_splits_for(max_len: int, block: int = 256) -> int:
    """Enough splits to fill the chip at long contexts; a static choice per context."""
    return max(1, min(64, triton.cdiv(max_len, 4 * block)))


def ragged_decode(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cu_lens: torch.Tensor,
    scale: float, n_splits: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (S, R, d) rows per sequence over keys/values (N, d), cu_lens (S+1,).

    Returns out (S, R, d) in q's dtype and lse (S, R) fp32 (-inf for an empty sequence).
    """
    s, r, d = q.shape
    q = q.contiguous()
    part_o = torch.empty(s, n_splits, r, d, dtype=torch.float32, device=q.device)
    part_l = torch.empty(s, n_splits, r, dtype=torch.float32, device=q.device)
    block_r = max(16, triton.next_power_of_2(r))
    _partial_kernel[(s, n_splits)](
        q, keys, values, cu_lens, part_o, part_l, scale, r,
        q.stride(0), q.stride(1), part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_l.stride(0), part_l.stride(1),
        D=d, BLOCK_R=block_r, BLOCK_N=64, N_SPLITS=n_splits, num_warps=4,
    )
    lse = torch.logsumexp(part_l, dim=1)  # (S, R)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(part_l - safe.unsqueeze(1)).unsqueeze(-1)  # (S, P, R, 1)
    out = (part_o * weights).sum(dim=1)
    return out.to(q.dtype), lse
