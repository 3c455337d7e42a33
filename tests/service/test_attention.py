"""Ragged attention + tail merge against dense attention with evicted keys masked."""

from __future__ import annotations

import pytest
import torch

from service.engine import backends
from service.engine.kvcache import RaggedLayer


def _dense_masked(q, keys, values, keep, tail_k, tail_v, scale):
    """Independent reference: one softmax over [context (evicted masked), tail (causal)]."""
    hq, t, _ = q.shape
    h, n, _ = keys.shape
    group = hq // h
    k = torch.cat([keys, tail_k], 1).repeat_interleave(group, 0)
    v = torch.cat([values, tail_v], 1).repeat_interleave(group, 0)
    allowed = torch.ones(hq, t, n + tail_k.shape[1], dtype=torch.bool)
    allowed[:, :, :n] = keep.repeat_interleave(group, 0).unsqueeze(1)
    tail = tail_k.shape[1]
    allowed[:, :, n:] = torch.ones(t, tail, dtype=torch.bool).tril(tail - t)  # i sees j<=i+S-t
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


@pytest.mark.parametrize("t,tail", [(1, 1), (1, 9), (5, 5), (4, 12)])
@pytest.mark.parametrize("backend", backends.available_backends())
def test_ragged_plus_tail_equals_dense_masked(backend, t, tail):
    torch.manual_seed(t * 100 + tail)
    backends.set_backend(backend)
    h, group, n, d = 3, 4, 50, 16
    q = torch.randn(h * group, t, d)
    keys, values = torch.randn(h, n, d), torch.randn(h, n, d)
    keep = torch.rand(h, n) < 0.4
    keep[:, :3] = True  # a protected prefix
    keep[1, 3:] = False  # one head keeps only its prefix
    layer = RaggedLayer.from_dense(keys, values, torch.zeros(h, n)).keep(keep.reshape(-1))
    tail_k, tail_v = torch.randn(h, tail, d), torch.randn(h, tail, d)
    scale = d**-0.5
    out_c, lse_c = backends.ragged_attention(q, layer.keys, layer.values, layer.cu_lens, scale)
    out_t, lse_t = backends.causal_attention(q, tail_k, tail_v, scale)
    ours = backends.merge_partials(out_c, lse_c, out_t, lse_t)
    ref = _dense_masked(q, keys, values, keep, tail_k, tail_v, scale)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_empty_context_head_contributes_nothing():
    h, d = 2, 8
    q = torch.randn(h, 1, d)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    out, lse = backends.ragged_attention(q, torch.empty(0, d), torch.empty(0, d), cu, 0.3)
    assert torch.isneginf(lse).all() and (out == 0).all()
    out_t, lse_t = backends.causal_attention(q, torch.randn(h, 3, d), torch.randn(h, 3, d), 0.3)
    torch.testing.assert_close(backends.merge_partials(out, lse, out_t, lse_t), out_t)


@pytest.mark.parametrize(
    "device,available,capability,want",
    [
        ("cpu", ["reference", "sdpa"], None, "sdpa"),
        ("cuda", ["cuda", "cudnn", "flash_attn", "reference", "sdpa"], (9, 0), "cudnn"),
        ("cuda", ["cuda", "cudnn", "flash_attn", "reference", "sdpa"], (8, 0), "flash_attn"),
        ("cuda", ["cuda", "cudnn", "reference", "sdpa"], (8, 6), "cuda"),
        ("cuda", ["cuda", "reference", "sdpa"], (9, 0), "cuda"),
        ("cuda", ["reference", "sdpa"], (9, 0), "reference"),
    ],
)
def test_auto_backend_choice(device, available, capability, want):
    assert backends.pick_auto(torch.device(device), available, capability) == want
