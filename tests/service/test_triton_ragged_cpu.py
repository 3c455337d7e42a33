"""The Triton decode kernels (service.engine.backends.triton_ragged) against the reference, on CPU
under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).

fp32 inputs: the interpreter's bf16 dot is not faithful. The compiled kernels are tested on
the GPU in test_gpu.py (bf16, graph capture); this file keeps their arithmetic (split-K
partials, LSE merge, causal limit of the static tail, empty heads) checked in CI.
"""

from __future__ import annotations

import os

import pytest
import torch

from service.engine.backends import reference
from service.engine.kvcache import RaggedLayer
from service.engine.static_cache import static_tail_attention

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter tests (the GPU runs the compiled kernels)", allow_module_level=True)
triton_ragged = pytest.importorskip("service.engine.backends.triton_ragged")


def _layer(h: int, n: int, d: int, keep_p: float, seed: int) -> RaggedLayer:
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(h, n, d, generator=gen), torch.randn(h, n, d, generator=gen)
    keep = torch.rand(h, n, generator=gen) < keep_p
    keep[0] = False  # one empty head: its lse must be -inf and it must add nothing
    return RaggedLayer.from_dense(keys, values, torch.zeros(h, n)).keep(keep.reshape(-1))


@pytest.mark.parametrize("g,t,n_splits", [(4, 1, 1), (4, 3, 4), (2, 5, 3)])
def test_ragged_decode_matches_reference(g, t, n_splits):
    h, n, d = 3, 300, 16
    layer = _layer(h, n, d, 0.4, seed=g + t)
    q = torch.randn(h * g, t, d, generator=torch.Generator().manual_seed(1))
    out, lse = triton_ragged.ragged_decode(
        q.reshape(h, g * t, d), layer.keys, layer.values, layer.cu_lens, d**-0.5, n_splits
    )
    ref_out, ref_lse = reference.ragged_attention(
        q, layer.keys, layer.values, layer.cu_lens, d**-0.5
    )
    torch.testing.assert_close(lse.view(h * g, t), ref_lse, atol=1e-4, rtol=1e-4)
    live = ref_lse.isfinite()
    torch.testing.assert_close(out.view(h * g, t, d)[live], ref_out[live], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch,t", [(1, 1), (2, 1), (2, 2)])
def test_fused_decode_matches_context_plus_tail(batch, t):
    """Context + static tail in one kernel pair == ragged context ⊕ masked tail by LSE."""
    h, g, n, d, capacity = 2, 3, 200, 16, 12
    layer = _layer(h, n, d, 0.5, seed=batch * 10 + t)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(batch, h * g, t, d, generator=gen)
    tail_k = torch.randn(batch, h, capacity, d, generator=gen)
    tail_v = torch.randn(batch, h, capacity, d, generator=gen)
    length = torch.tensor([3, 6][:batch])  # earlier tokens per row; this step's t follow
    got = triton_ragged.fused_decode(
        q, layer.keys, layer.values, layer.cu_lens, tail_k, tail_v, length, d**-0.5, 2
    )
    folded = q.permute(1, 0, 2, 3).reshape(h * g, batch * t, d)
    ctx_out, ctx_lse = reference.ragged_attention(
        folded, layer.keys, layer.values, layer.cu_lens, d**-0.5
    )
    ctx_out = ctx_out.view(h * g, batch, t, d).permute(1, 0, 2, 3)
    ctx_lse = ctx_lse.view(h * g, batch, t).permute(1, 0, 2)
    tail_out, tail_lse = static_tail_attention(q, tail_k, tail_v, length, d**-0.5)
    lse = torch.logaddexp(ctx_lse, tail_lse)
    want = (
        ctx_out * torch.exp(ctx_lse - lse)[..., None]
        + tail_out * torch.exp(tail_lse - lse)[..., None]
    )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t,n_splits", [(1, 1), (1, 3), (2, 2)])
def test_rows_decode_matches_each_row_alone(t, n_splits):
    """Rows on different contexts in one launch (pointer table) == each row's fused decode
    over its own context, computed alone."""
    triton_rows = pytest.importorskip("service.engine.backends.triton_rows")
    h, g, d, capacity = 2, 3, 16, 12
    layers = [_layer(h, n, d, 0.5, seed=n) for n in (150, 260, 90)]
    which = [0, 1, 2, 1]  # rows 1 and 3 share a context
    batch = len(which)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, h * g, t, d, generator=gen)
    tail_k = torch.randn(batch, h, capacity, d, generator=gen)
    tail_v = torch.randn(batch, h, capacity, d, generator=gen)
    length = torch.tensor([0, 3, 6, 2])
    table = triton_rows.pointer_table(
        [(layers[i].keys, layers[i].values, layers[i].cu_lens) for i in which], q.device
    )
    got = triton_rows.rows_decode(q, table, tail_k, tail_v, length, d**-0.5, n_splits)
    for b, i in enumerate(which):
        alone = triton_ragged.fused_decode(
            q[b : b + 1],
            layers[i].keys,
            layers[i].values,
            layers[i].cu_lens,
            tail_k[b : b + 1],
            tail_v[b : b + 1],
            length[b : b + 1],
            d**-0.5,
            2,
        )
        torch.testing.assert_close(got[b : b + 1], alone, atol=1e-4, rtol=1e-4)
