# mypy: disable-error-code="untyped-decorator,no-untyped-def,no-any-return"
"""Triton kernel for the partial-attention merge (GPU backends).

`merge`: exact softmax merge of two partial attention outputs by their log-sum-exp, one
pass, written straight into the (B, T, Hq, d) layout the model consumes next. Takes
strides, so views go in without copies. Tested on CPU under TRITON_INTERPRET=1 against
`service.engine.backends.merge_partials`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MERGE_ROWS = 32  # (b, h, t) rows per program


@triton.jit
def _merge_kernel(
    OA,
    LA,
    OB,
    LB,
    OUT,
    N_ROWS,
    D1,
    D2,
    sa0,
    sa1,
    sa2,
    sla0,
    sla1,
    sla2,
    sb0,
    sb1,
    sb2,
    slb0,
    slb1,
    slb2,
    so0,
    so1,
    so2,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row (i0, i1, i2): out = (e^{la} oa + e^{lb} ob) / (e^{la} + e^{lb}), in fp32."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N_ROWS
    i2 = rows % D2
    i1 = (rows // D2) % D1
    i0 = rows // (D2 * D1)
    cols = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (cols < D)[None, :]
    la = tl.load(LA + i0 * sla0 + i1 * sla1 + i2 * sla2, mask=ok, other=float("-inf"))
    lb = tl.load(LB + i0 * slb0 + i1 * slb1 + i2 * slb2, mask=ok, other=float("-inf"))
    top = tl.maximum(la, lb)
    top = tl.where(top == float("-inf"), 0.0, top)
    wa = tl.exp(la - top)
    wb = tl.exp(lb - top)
    total = wa + wb
    total = tl.where(total > 0, total, 1.0)
    wa = wa / total
    wb = wb / total
    oa = tl.load(
        OA + (i0 * sa0 + i1 * sa1 + i2 * sa2)[:, None] + cols[None, :], mask=mask, other=0.0
    )
    ob = tl.load(
        OB + (i0 * sb0 + i1 * sb1 + i2 * sb2)[:, None] + cols[None, :], mask=mask, other=0.0
    )
    out = oa.to(tl.float32) * wa[:, None] + ob.to(tl.float32) * wb[:, None]
    tl.store(
        OUT + (i0 * so0 + i1 * so1 + i2 * so2)[:, None] + cols[None, :],
        out.to(OUT.dtype.element_ty),
        mask=mask,
    )


def _as3(x: torch.Tensor, lead: int) -> torch.Tensor:
    """Pad leading dims to three (a view)."""
    for _ in range(3 - lead):
        x = x.unsqueeze(0)
    return x


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Softmax over the union of two key sets from partial outputs, one fused pass.

    out_* (..., d) with one to three leading dims (e.g. (Hq, T, d) or (B, Hq, T, d)), any
    strides with a contiguous last dim; lse_* (...) fp32. Returns out_a's shape and dtype;
    a 4-D (B, Hq, T, d) result is laid out as (B, T, Hq, d) in memory (a transposed view),
    so the model's following `.transpose(1, 2).contiguous()` costs nothing.
    """
    shape = out_a.shape
    lead = out_a.dim() - 1
    if not 1 <= lead <= 3:
        raise ValueError(f"merge takes 2-4 dims, got {tuple(shape)}")
    d = shape[-1]
    if out_a.stride(-1) != 1:
        out_a = out_a.contiguous()
    if out_b.stride(-1) != 1:
        out_b = out_b.contiguous()
    if lead == 3:
        b, hq, t = shape[:3]
        out = torch.empty(b, t, hq, d, dtype=out_a.dtype, device=out_a.device).transpose(1, 2)
    else:
        out = torch.empty(shape, dtype=out_a.dtype, device=out_a.device)
    oa, ob, o3 = _as3(out_a, lead), _as3(out_b, lead), _as3(out, lead)
    la, lb = _as3(lse_a, lead), _as3(lse_b, lead)
    d1, d2 = oa.shape[1], oa.shape[2]
    n_rows = oa.shape[0] * d1 * d2
    if n_rows == 0:
        return out
    _merge_kernel[(triton.cdiv(n_rows, MERGE_ROWS),)](
        oa,
        la,
        ob,
        lb,
        o3,
        n_rows,
        d1,
        d2,
        *oa.stride()[:3],
        *la.stride(),
        *ob.stride()[:3],
        *lb.stride(),
        *o3.stride()[:3],
        D=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK=MERGE_ROWS,
        num_warps=4,
    )
    return out
