"""CUDA backends against the plain-PyTorch reference, and graph decoding == eager decoding.

Run on a GPU machine: `pytest -m gpu tests/service/test_gpu.py`. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from service.backends import reference
from service.kvcache import RaggedLayer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def _ragged(h, n, d, keep_p, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    keys = torch.randn(h, n, d, device="cuda", dtype=dtype, generator=g)
    values = torch.randn(h, n, d, device="cuda", dtype=dtype, generator=g)
    keep = torch.rand(h, n, device="cuda", generator=g) < keep_p
    keep[:, :4] = True
    return RaggedLayer.from_dense(keys, values, torch.zeros(h, n, device="cuda")).keep(
        keep.reshape(-1)
    )


@pytest.mark.parametrize("g,t", [(4, 1), (4, 16), (8, 1), (4, 3), (4, 40), (6, 500)])
@pytest.mark.parametrize("n", [37, 3000, 70000])
def test_cuda_ragged_attention_matches_reference(g, t, n):
    from service.backends import cuda

    h, d = 8, 128
    layer = _ragged(h, n, d, 0.3, torch.bfloat16, seed=n + t)
    q = torch.randn(h * g, t, d, device="cuda", dtype=torch.bfloat16)
    out, lse = cuda.ragged_attention(q, layer.keys, layer.values, layer.cu_lens, d**-0.5)
    ref_out, ref_lse = reference.ragged_attention(
        q, layer.keys, layer.values, layer.cu_lens, d**-0.5
    )
    assert _rel(out, ref_out) < 2e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("t,s", [(1, 1), (1, 50), (7, 7), (5, 300), (2048, 2048), (1000, 5000)])
def test_cuda_causal_attention_matches_reference(t, s):
    from service.backends import cuda

    hq, h, d = 32, 8, 128
    q = torch.randn(hq, t, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(h, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(h, s, d, device="cuda", dtype=torch.bfloat16)
    out, lse = cuda.causal_attention(q, k, v, d**-0.5)
    ref_out, ref_lse = reference.causal_attention(q, k, v, d**-0.5)
    assert _rel(out, ref_out) < 2e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


def test_empty_heads_give_neg_inf_lse():
    from service.backends import cuda

    h, d = 4, 64
    cu = torch.tensor([0, 0, 10, 10, 30], dtype=torch.int32, device="cuda")
    keys = torch.randn(30, d, device="cuda", dtype=torch.bfloat16)
    for t in (1, 100):
        q = torch.randn(h * 2, t, d, device="cuda", dtype=torch.bfloat16)
        _, lse = cuda.ragged_attention(q, keys, keys, cu, 0.1)
        assert torch.isneginf(lse[0:2]).all() and torch.isneginf(lse[4:6]).all()
        assert torch.isfinite(lse[2:4]).all()


def test_graph_decoding_equals_eager_decoding(tiny_model_dir):
    from service.config import CompressionConfig, EngineConfig
    from service.engine import KVzipEngine
    from service.types import SamplingParams

    engine = KVzipEngine.load(
        EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16")
    )
    doc = engine.encode_document("The tide comes in twice a day at the old harbour. " * 40)
    ctx = engine.ingest(doc, CompressionConfig("kvzip", 0.3, 256))
    prompts = [engine.encode_question(q) for q in ("When?", "Where is the harbour?", "Why?")]
    params = SamplingParams(max_new_tokens=12)
    graph = list(engine.generate_batch(ctx, prompts, params, use_graph=True))
    eager = list(engine.generate_batch(ctx, prompts, params, use_graph=False))
    assert graph == eager and len(graph) >= 3


@pytest.mark.parametrize("batch,t,n", [(1, 1, 5000), (4, 1, 70000), (16, 1, 3000), (2, 3, 900)])
def test_fused_static_decode_matches_reference(batch, t, n):
    """Context + static tail + merge in one pass == reference context ⊕ reference tail."""
    from service.backends import cuda, merge_partials

    h, g, d, cap = 8, 4, 128, 64
    layer = _ragged(h, n, d, 0.3, torch.bfloat16, seed=batch * 7 + n)
    q = torch.randn(batch, h * g, t, d, device="cuda", dtype=torch.bfloat16)
    tail_k = torch.randn(batch, h, cap, d, device="cuda", dtype=torch.bfloat16)
    tail_v = torch.randn(batch, h, cap, d, device="cuda", dtype=torch.bfloat16)
    length = torch.randint(0, cap - t, (batch,), device="cuda")
    out = cuda.fused_static_decode(
        q, layer.keys, layer.values, layer.cu_lens, tail_k, tail_v, length, d**-0.5
    )
    assert out is not None
    for b in range(batch):
        oc, lc = reference.ragged_attention(q[b], layer.keys, layer.values, layer.cu_lens, d**-0.5)
        end = int(length[b]) + t
        ot, lt = reference.causal_attention(q[b], tail_k[b, :, :end], tail_v[b, :, :end], d**-0.5)
        assert _rel(out[b], merge_partials(oc, lc, ot, lt)) < 2e-2
