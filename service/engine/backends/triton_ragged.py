# mypy: disable-error-code="untyped-decorator,no-untyped-def,no-any-return"
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
def _attend(q, k_base, v_base, stride_k, lo, hi, limit, scale, BLOCK_R: tl.constexpr,
            BLOCK_N: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """Online softmax of q (BLOCK_R, D) over keys/values [lo, hi) at k_base/v_base (row
    stride `stride_k`), key j seen by row r only when j <= limit[r] -> out (BLOCK_R, D) fp32
    and lse (BLOCK_R,) (-inf for a row that saw nothing)."""
    cols = tl.arange(0, D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    n0 = lo
    while n0 < hi:  # a while loop: dynamic bounds, also under TRITON_INTERPRET
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < hi
        k = tl.load(
            k_base + offs[:, None] * stride_k + cols[None, :], mask=valid[:, None], other=0.0
        )
        s = (tl.dot(q, tl.trans(k)).to(tl.float32) * scale).to(tl.float32)
        ok = valid[None, :] & (offs[None, :] <= limit[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        s_sum = s_sum * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs[:, None] * stride_k + cols[None, :], mask=valid[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
        n0 += BLOCK_N
    safe = tl.where(s_sum > 0, s_sum, 1.0)
    return acc / safe[:, None], tl.where(s_sum > 0, m + tl.log(safe), float("-inf"))


@triton.jit
def _partial_kernel(
    Q,
    K,
    V,
    CU,
    PO,
    PL,
    scale,
    R,
    stride_qs,
    stride_qr,
    stride_os,
    stride_op,
    stride_or,
    stride_ls,
    stride_lp,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_SPLITS: tl.constexpr,
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
    q = tl.load(
        Q + seq * stride_qs + rows[:, None] * stride_qr + cols[None, :],
        mask=rows[:, None] < R,
        other=0.0,
    )
    limit = tl.full([BLOCK_R], 2147483647, tl.int32)
    out, lse = _attend(q, K + start * D, V + start * D, D, lo, hi, limit, scale, BLOCK_R,
                       BLOCK_N, D)  # fmt: skip
    o_ptr = PO + seq * stride_os + split * stride_op + rows[:, None] * stride_or + cols[None, :]
    tl.store(o_ptr, out, mask=rows[:, None] < R)
    tl.store(PL + seq * stride_ls + split * stride_lp + rows, lse, mask=rows < R)


def n_splits_for(max_len: int, block: int = 256) -> int:
    """Enough splits to fill the chip at long contexts; a static choice per context."""
    return max(1, min(64, triton.cdiv(max_len, 4 * block)))


def ragged_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_lens: torch.Tensor,
    scale: float,
    n_splits: int = 16,
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
        q,
        keys,
        values,
        cu_lens,
        part_o,
        part_l,
        scale,
        r,
        q.stride(0),
        q.stride(1),
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        part_l.stride(0),
        part_l.stride(1),
        D=d,
        BLOCK_R=block_r,
        BLOCK_N=64,
        N_SPLITS=n_splits,
        num_warps=4,
    )
    lse = torch.logsumexp(part_l, dim=1)  # (S, R)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(part_l - safe.unsqueeze(1)).unsqueeze(-1)  # (S, P, R, 1)
    out = (part_o * weights).sum(dim=1)
    return out.to(q.dtype), lse


@triton.jit
def _fused_partial_kernel(
    Q,
    K,
    V,
    CU,
    TK,
    TV,
    LEN,
    PO,
    PL,
    scale,
    R,
    T_STEP,
    BT,
    stride_qs,
    stride_qr,
    stride_tb,
    stride_th,
    stride_tc,
    stride_os,
    stride_op,
    stride_or,
    stride_ls,
    stride_lp,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_SPLITS: tl.constexpr,
):
    """Splits 0..N_SPLITS-1: the ragged context of KV head `seq`; split N_SPLITS + b: the
    static tail of batch row b (keys j <= LEN[b] + t for query step t). Row r of head `seq`
    is query (g, b, t) with r = g * BT + b * T_STEP + t."""
    seq = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D)
    q = tl.load(
        Q + seq * stride_qs + rows[:, None] * stride_qr + cols[None, :],
        mask=rows[:, None] < R,
        other=0.0,
    )
    is_ctx = split < N_SPLITS
    bounds = tl.load(CU + seq + tl.arange(0, 2))
    start = tl.min(bounds, axis=0)
    ctx_len = tl.max(bounds, axis=0) - start
    per = tl.cdiv(tl.cdiv(ctx_len, N_SPLITS), BLOCK_N) * BLOCK_N
    b = tl.maximum(split - N_SPLITS, 0)
    tail_hi = tl.max(tl.load(LEN + b + tl.arange(0, 1)), axis=0).to(tl.int32) + T_STEP
    lo = tl.where(is_ctx, split * per, 0)
    hi = tl.where(is_ctx, tl.minimum(split * per + per, ctx_len), tail_hi)
    k_base = tl.where(is_ctx, K + start * D, TK + b * stride_tb + seq * stride_th)
    v_base = tl.where(is_ctx, V + start * D, TV + b * stride_tb + seq * stride_th)
    stride_k = tl.where(is_ctx, D, stride_tc)
    row_b = (rows % BT) // T_STEP
    row_t = rows % T_STEP
    tail_limit = tl.where(row_b == b, tail_hi - T_STEP + row_t, -1)
    limit = tl.where(is_ctx, 2147483647, tail_limit)
    out, lse = _attend(q, k_base, v_base, stride_k, lo, hi, limit, scale, BLOCK_R, BLOCK_N, D)
    o_ptr = PO + seq * stride_os + split * stride_op + rows[:, None] * stride_or + cols[None, :]
    tl.store(o_ptr, out, mask=rows[:, None] < R)
    tl.store(PL + seq * stride_ls + split * stride_lp + rows, lse, mask=rows < R)


@triton.jit
def _combine_kernel(
    PO,
    PL,
    OUT,
    P,
    stride_os,
    stride_op,
    stride_or,
    stride_ls,
    stride_lp,
    stride_outs,
    stride_outr,
    D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """out[seq, r] = sum_p exp(lse_p - lse) o_p over the P partials of one query row."""
    seq = tl.program_id(0)
    r = tl.program_id(1)
    parts = tl.arange(0, BLOCK_P)
    cols = tl.arange(0, D)
    lse = tl.load(PL + seq * stride_ls + parts * stride_lp + r, mask=parts < P, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top)
    o = tl.load(
        PO + seq * stride_os + parts[:, None] * stride_op + r * stride_or + cols[None, :],
        mask=parts[:, None] < P,
        other=0.0,
    )
    total = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(OUT + seq * stride_outs + r * stride_outr + cols, out.to(OUT.dtype.element_ty))


def combine(part_o: torch.Tensor, part_l: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Partials (S, P, R, d) fp32 with their lse (S, P, R) -> (S, R, d) in `dtype`."""
    s, parts, r, d = part_o.shape
    out = torch.empty(s, r, d, dtype=dtype, device=part_o.device)
    _combine_kernel[(s, r)](
        part_o,
        part_l,
        out,
        parts,
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        part_l.stride(0),
        part_l.stride(1),
        out.stride(0),
        out.stride(1),
        D=d,
        BLOCK_P=max(2, triton.next_power_of_2(parts)),
    )
    return out


def fused_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_lens: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    length: torch.Tensor,
    scale: float,
    n_splits: int,
) -> torch.Tensor:
    """Context + static tail in one pass: the merged attention output.

    q (B, Hq, T, d); keys/values (N, d), cu_lens (H+1,); tail_k/tail_v (B, H, C, d) with
    length (B,) earlier tokens per row (this step's T already written after them).
    Returns (B, Hq, T, d) in q's dtype. Static launch shapes: CUDA-graph capturable.
    """
    b, hq, t, d = q.shape
    h = cu_lens.numel() - 1
    g = hq // h
    rows = q.view(b, h, g, t, d).permute(1, 2, 0, 3, 4).reshape(h, g * b * t, d)
    r = rows.shape[1]
    parts = n_splits + b
    part_o = torch.empty(h, parts, r, d, dtype=torch.float32, device=q.device)
    part_l = torch.empty(h, parts, r, dtype=torch.float32, device=q.device)
    _fused_partial_kernel[(h, parts)](
        rows,
        keys,
        values,
        cu_lens,
        tail_k,
        tail_v,
        length,
        part_o,
        part_l,
        scale,
        r,
        t,
        b * t,
        rows.stride(0),
        rows.stride(1),
        tail_k.stride(0),
        tail_k.stride(1),
        tail_k.stride(2),
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        part_l.stride(0),
        part_l.stride(1),
        D=d,
        BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_N=64,
        N_SPLITS=n_splits,
        num_warps=4,
    )
    out = combine(part_o, part_l, q.dtype)
    return out.view(h, g, b, t, d).permute(2, 0, 1, 3, 4).reshape(b, hq, t, d)
