# mypy: disable-error-code="untyped-decorator,no-untyped-def,no-any-return"
"""Triton decode step of a continuous batch whose rows attend to different contexts.

Row b of the batch attends to its own compressed context (ragged keys/values (N_b, d) with
cu_lens (H+1,), one per row, possibly shared) and to its own static tail (B, H, C, d).
The contexts are separate tensors, so the kernel reads their addresses from a pointer
table (3, B) int64 (keys, values, cu_lens of each row's context for this layer) and casts
them to pointers on the device: one launch per layer whatever the mix of contexts, where
grouping rows by context costs one launch per distinct context.

Program (b * H + h, split): splits 0..N_SPLITS-1 take slices of row b's context head h,
split N_SPLITS takes row b's tail (keys j <= LEN[b] + t for query step t); the partials
are merged by log-sum-exp in `triton_ragged`'s combine kernel. Shapes and the table's
address are static, so the step stays CUDA-graph capturable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from service.engine.backends.triton_ragged import _attend, combine, n_splits_for


@triton.jit
def _rows_partial_kernel(
    Q,
    PTRS,
    TK,
    TV,
    LEN,
    PO,
    PL,
    scale,
    R,
    H,
    B,
    T_STEP,
    stride_qb,
    stride_qh,
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
    seq = tl.program_id(0)
    split = tl.program_id(1)
    b = seq // H
    h = seq % H
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qr + cols[None, :],
        mask=rows[:, None] < R,
        other=0.0,
    )
    elem = TK.dtype.element_ty
    ctx_k = tl.load(PTRS + b).to(tl.pointer_type(elem))
    ctx_v = tl.load(PTRS + B + b).to(tl.pointer_type(elem))
    ctx_cu = tl.load(PTRS + 2 * B + b).to(tl.pointer_type(tl.int32))
    bounds = tl.load(ctx_cu + h + tl.arange(0, 2))
    start = tl.min(bounds, axis=0)
    ctx_len = tl.max(bounds, axis=0) - start
    is_ctx = split < N_SPLITS
    per = tl.cdiv(tl.cdiv(ctx_len, N_SPLITS), BLOCK_N) * BLOCK_N
    tail_hi = tl.max(tl.load(LEN + b + tl.arange(0, 1)), axis=0).to(tl.int32) + T_STEP
    lo = tl.where(is_ctx, split * per, 0)
    hi = tl.where(is_ctx, tl.minimum(split * per + per, ctx_len), tail_hi)
    k_base = tl.where(is_ctx, ctx_k + start * D, TK + b * stride_tb + h * stride_th)
    v_base = tl.where(is_ctx, ctx_v + start * D, TV + b * stride_tb + h * stride_th)
    stride_k = tl.where(is_ctx, D, stride_tc)
    limit = tl.where(is_ctx, 2147483647, tail_hi - T_STEP + rows % T_STEP)
    out, lse = _attend(q, k_base, v_base, stride_k, lo, hi, limit, scale, BLOCK_R, BLOCK_N, D)
    o_ptr = PO + seq * stride_os + split * stride_op + rows[:, None] * stride_or + cols[None, :]
    tl.store(o_ptr, out, mask=rows[:, None] < R)
    tl.store(PL + seq * stride_ls + split * stride_lp + rows, lse, mask=rows < R)


def pointer_table(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], device: torch.device
) -> torch.Tensor:
    """(3, B) int64 on `device`: the addresses of each row's context keys (N, d), values
    (N, d) and cu_lens (H+1,) int32, from one layer's (keys, values, cu_lens) per row.

    The tensors must stay alive while the table is used (the batch's rows hold them)."""
    for keys, values, cu_lens in layers:
        if keys.stride(-1) != 1 or values.stride(-1) != 1 or keys.dim() != 2:
            raise ValueError("context keys/values must be (N, d) with unit stride in d")
        if cu_lens.dtype != torch.int32:
            raise ValueError("cu_lens must be int32")
    table = [[t.data_ptr() for t in column] for column in zip(*layers, strict=True)]
    host = torch.tensor(table, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def splits_for(context_tokens: Sequence[int], n_heads: int) -> int:
    """One split count for a batch: from the longest average head among its contexts."""
    return n_splits_for(max(1, max(context_tokens, default=1) // max(n_heads, 1)))


def rows_decode(
    q: torch.Tensor,
    pointers: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    length: torch.Tensor,
    scale: float,
    n_splits: int,
) -> torch.Tensor:
    """Each row over its own context + its own static tail, merged: the attention output.

    q (B, Hq, T, d); pointers (3, B) from `pointer_table` (contexts of H KV heads, d-dim,
    q's dtype); tail_k/tail_v (B, H, C, d) with length (B,) earlier tokens per row (this
    step's T already written after them). Returns (B, Hq, T, d) in q's dtype.
    """
    b, hq, t, d = q.shape
    h = tail_k.shape[1]
    g = hq // h
    rows = q.reshape(b, h, g * t, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    r = g * t
    parts = n_splits + 1
    part_o = torch.empty(b * h, parts, r, d, dtype=torch.float32, device=q.device)
    part_l = torch.empty(b * h, parts, r, dtype=torch.float32, device=q.device)
    _rows_partial_kernel[(b * h, parts)](
        rows,
        pointers,
        tail_k,
        tail_v,
        length,
        part_o,
        part_l,
        scale,
        r,
        h,
        b,
        t,
        rows.stride(0),
        rows.stride(1),
        rows.stride(2),
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
    return combine(part_o, part_l, q.dtype).view(b, hq, t, d)
