# mypy: disable-error-code="untyped-decorator,no-untyped-def,no-any-return"
"""Triton kernels for KVzip scoring (CUDA backend).

`max_logits`: for every chunk key i, max over a block of query rows r of
q_r . k_i * scale - shift[r], without materialising the (rows x m) logits: programs over
(output head, key block, row split) keep their key tile resident and stream the query
rows through `tl.dot` with fp32 accumulation. With shift = the local log-normaliser this is
log of KVzip's max local-softmax probability (service.compression.reconstruction.local_scores).

`range_lse`: log-sum-exp of q over the union of two key views (prefix + chunk, both
strided views of the dense cache, so nothing is concatenated).

(The partial-attention merge kernel is in `triton_merge`.)

Every kernel takes strides, so views of the dense (H, S, d) cache go in without copies.
Tested on CPU under TRITON_INTERPRET=1 against the torch code they replace.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 64  # chunk keys per program (resident tile)
BLOCK_R = 64  # query rows per step
LSE_BLOCK_R = 64  # query rows per program in range_lse
LSE_BLOCK_N = 64  # keys per step in range_lse
_INTERPRETED = bool(triton.knobs.runtime.interpret)  # read when the kernels are decorated


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. PRECISION "interpret": upcast first (the CPU
    interpreter's 16-bit dot is wrong; the fp32 products of 16-bit inputs are exact)."""
    if PRECISION == "interpret":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _max_logit_step(
    best, k, Q, SHIFT, r0, oh, scale, T, R, QH_PER_OUT,
    stride_qh, stride_qt, stride_qd, stride_lh, stride_lt, cols, col_ok,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One block of query rows against the resident key tile: the updated running max."""
    rows = r0 + tl.arange(0, BLOCK_R)
    ok = rows < R
    qh = oh * QH_PER_OUT + rows // T
    t = rows % T
    q = tl.load(
        Q + qh[:, None] * stride_qh + t[:, None] * stride_qt + cols[None, :] * stride_qd,
        mask=ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    shift = tl.load(SHIFT + qh * stride_lh + t * stride_lt, mask=ok, other=float("inf"))
    s = _dot(k, tl.trans(q), PRECISION) * scale  # (BLOCK_M, BLOCK_R)
    s = s - shift[None, :]
    s = tl.where(ok[None, :], s, float("-inf"))
    return tl.maximum(best, tl.max(s, 1))


@triton.jit
def _max_logit_kernel(
    Q,
    K,
    SHIFT,
    OUT,
    scale,
    T,
    R,
    M,
    G,
    QH_PER_OUT,
    N_ITER,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kh,
    stride_km,
    stride_kd,
    stride_lh,
    stride_lt,
    stride_op,
    stride_oh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """OUT[split, oh, i] = max over rows r of this split of q_r . k_i * scale - SHIFT[r].

    Output head oh covers query heads oh * QH_PER_OUT .. + QH_PER_OUT - 1 (row r is query
    head oh * QH_PER_OUT + r // T, position r % T; R = QH_PER_OUT * T rows) and reads KV
    head (oh * QH_PER_OUT) // G. Split p handles rows [p * N_ITER * BLOCK_R, ...).
    """
    oh = tl.program_id(0)
    mb = tl.program_id(1)
    split = tl.program_id(2)
    kv = (oh * QH_PER_OUT) // G
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    k = tl.load(
        K + kv * stride_kh + offs_m[:, None] * stride_km + cols[None, :] * stride_kd,
        mask=(offs_m[:, None] < M) & col_ok[None, :],
        other=0.0,
    )
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    r_base = split * N_ITER * BLOCK_R
    if INTERPRET:  # the interpreter cannot range() over a runtime scalar
        i = 0
        while i < N_ITER:
            best = _max_logit_step(
                best, k, Q, SHIFT, r_base + i * BLOCK_R, oh, scale, T, R, QH_PER_OUT,
                stride_qh, stride_qt, stride_qd, stride_lh, stride_lt, cols, col_ok,
                BLOCK_R, PRECISION,
            )  # fmt: skip
            i += 1
    else:  # a for loop: software-pipelined by the compiler
        for i in range(0, N_ITER):
            best = _max_logit_step(
                best, k, Q, SHIFT, r_base + i * BLOCK_R, oh, scale, T, R, QH_PER_OUT,
                stride_qh, stride_qt, stride_qd, stride_lh, stride_lt, cols, col_ok,
                BLOCK_R, PRECISION,
            )  # fmt: skip
    tl.store(OUT + split * stride_op + oh * stride_oh + offs_m, best, mask=offs_m < M)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _interpret() -> bool:
    """True when this module's kernels were built under TRITON_INTERPRET=1 (CPU tests):
    loops then avoid range() over runtime scalars, which the interpreter cannot index with
    recent numpy, and dots upcast first."""
    return _INTERPRETED


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs: full-precision dot (the reference's fp32 matmul); 16-bit: native."""
    if _interpret():
        return "interpret"
    return "ieee" if dtype == torch.float32 else "tf32"


def _splits(programs: int, row_blocks: int, device: torch.device) -> int:
    """Row splits so that small key counts still fill the chip (a few programs per SM)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_blocks, triton.cdiv(4 * sms, max(programs, 1))))


def max_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    shift: torch.Tensor,
    scale: float,
    per_query_head: bool = False,
    n_splits: int | None = None,
) -> torch.Tensor:
    """max_r (q_r . k_i * scale - shift[r]) per chunk key i, fp32.

    q (Hq, T, d) (any strides); k (H, m, d) (any strides, e.g. a slice of the dense cache);
    shift (Hq, T) fp32. Query head j reads KV head j // (Hq // H). Returns (H, m), the max
    over the G query heads of each group and all T rows, or with per_query_head (Hq, m),
    the max over the T rows of each query head only.
    """
    hq, t, d = q.shape
    h, m, _ = k.shape
    g = hq // h
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    per_out = 1 if per_query_head else g
    n_out = hq if per_query_head else h
    rows = per_out * t
    m_blocks = triton.cdiv(m, BLOCK_M)
    row_blocks = max(1, triton.cdiv(rows, BLOCK_R))
    if n_splits is None:
        n_splits = _splits(n_out * m_blocks, row_blocks, q.device)
    n_splits = max(1, min(n_splits, row_blocks))
    n_iter = triton.cdiv(row_blocks, n_splits)
    n_splits = triton.cdiv(row_blocks, n_iter)
    out = torch.empty(n_splits, n_out, m, dtype=torch.float32, device=q.device)
    if m == 0:
        return out[0]
    _max_logit_kernel[(n_out, m_blocks, n_splits)](
        q,
        k,
        shift,
        out,
        scale,
        t,
        rows,
        m,
        g,
        per_out,
        n_iter,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        shift.stride(0),
        shift.stride(1),
        out.stride(0),
        out.stride(1),
        D=d,
        BLOCK_D=_block_d(d),
        BLOCK_M=BLOCK_M,
        BLOCK_R=BLOCK_R,
        PRECISION=_precision(q.dtype),
        INTERPRET=_interpret(),
        num_warps=4,
        num_stages=3,
    )
    return out[0] if n_splits == 1 else out.amax(dim=0)


def chunk_scores(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """KVzip scores (H, m) fp32: exp(max over group and rows of q.k * scale - lse)."""
    return torch.exp(max_logits(q, k, lse, scale))


@triton.jit
def _lse_step(
    m_i, l_i, q, base, j0, n, s_m, s_d, scale, cols, col_ok,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Online log-sum-exp over one block of keys: the updated (running max, scaled sum)."""
    offs = j0 + tl.arange(0, BLOCK_N)
    valid = offs < n
    k = tl.load(
        base + offs[:, None] * s_m + cols[None, :] * s_d,
        mask=valid[:, None] & col_ok[None, :],
        other=0.0,
    )
    s = _dot(q, tl.trans(k), PRECISION) * scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
    return m_new, l_i


@triton.jit
def _range_lse_kernel(
    Q,
    K1,
    K2,
    OUT,
    scale,
    T,
    R,
    N1,
    N2,
    G,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_ah,
    stride_am,
    stride_ad,
    stride_bh,
    stride_bm,
    stride_bd,
    stride_oh,
    stride_ot,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """OUT[j, t] = log sum_i exp(q_{j,t} . k_i * scale) over K1[kv] then K2[kv], no mask.

    Program (kv, row block): rows r of KV head kv are (query head kv * G + r // T, r % T).
    """
    kv = tl.program_id(0)
    rb = tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    qh = kv * G + rows // T
    t = rows % T
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    q = tl.load(
        Q + qh[:, None] * stride_qh + t[:, None] * stride_qt + cols[None, :] * stride_qd,
        mask=ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for part in tl.static_range(2):
        if part == 0:
            base = K1 + kv * stride_ah
            n = N1
            s_m = stride_am
            s_d = stride_ad
        else:
            base = K2 + kv * stride_bh
            n = N2
            s_m = stride_bm
            s_d = stride_bd
        if INTERPRET:
            j0 = 0
            while j0 < n:
                m_i, l_i = _lse_step(
                    m_i, l_i, q, base, j0, n, s_m, s_d, scale, cols, col_ok, BLOCK_N, PRECISION
                )
                j0 += BLOCK_N
        else:
            for j0 in range(0, n, BLOCK_N):
                m_i, l_i = _lse_step(
                    m_i, l_i, q, base, j0, n, s_m, s_d, scale, cols, col_ok, BLOCK_N, PRECISION
                )
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(OUT + qh * stride_oh + t * stride_ot, lse, mask=ok)


def range_lse(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, scale: float) -> torch.Tensor:
    """lse (Hq, T) fp32 of q (Hq, T, d) over the keys k1 (H, n1, d) and k2 (H, n2, d).

    All keys visible (they all precede the queries); -inf where there are none. k1/k2 may
    be any strided views (e.g. the prefix and one chunk of the dense cache).
    """
    hq, t, d = q.shape
    h = k1.shape[0]
    g = hq // h
    k1 = k1 if k1.dtype == q.dtype else k1.to(q.dtype)
    k2 = k2 if k2.dtype == q.dtype else k2.to(q.dtype)
    out = torch.empty(hq, t, dtype=torch.float32, device=q.device)
    rows = g * t
    if rows == 0:
        return out
    _range_lse_kernel[(h, triton.cdiv(rows, LSE_BLOCK_R))](
        q,
        k1,
        k2,
        out,
        scale,
        t,
        rows,
        k1.shape[1],
        k2.shape[1],
        g,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k1.stride(0),
        k1.stride(1),
        k1.stride(2),
        k2.stride(0),
        k2.stride(1),
        k2.stride(2),
        out.stride(0),
        out.stride(1),
        D=d,
        BLOCK_D=_block_d(d),
        BLOCK_R=LSE_BLOCK_R,
        BLOCK_N=LSE_BLOCK_N,
        PRECISION=_precision(q.dtype),
        INTERPRET=_interpret(),
        num_warps=4,
        num_stages=3,
    )
    return out
