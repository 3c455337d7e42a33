"""Ragged attention + tail merge against dense attention with evicted keys masked."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from service.config import CompressionConfig
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


CPU_BACKENDS = [b for b in backends.available_backends() if b not in backends.GPU_BACKENDS]
"""The GPU backends are checked against the reference on the GPU (test_gpu.py)."""


@pytest.mark.parametrize("t,tail", [(1, 1), (1, 9), (5, 5), (4, 12)])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_ragged_plus_tail_equals_dense_masked(name, t, tail):
    torch.manual_seed(t * 100 + tail)
    backend = backends.build_backend(name)
    h, group, n, d = 3, 4, 50, 16
    q = torch.randn(h * group, t, d)
    keys, values = torch.randn(h, n, d), torch.randn(h, n, d)
    keep = torch.rand(h, n) < 0.4
    keep[:, :3] = True  # a protected prefix
    keep[1, 3:] = False  # one head keeps only its prefix
    layer = RaggedLayer.from_dense(keys, values, torch.zeros(h, n)).keep(keep.reshape(-1))
    tail_k, tail_v = torch.randn(h, tail, d), torch.randn(h, tail, d)
    scale = d**-0.5
    out_c, lse_c = backend.ragged_attention(q, layer.keys, layer.values, layer.cu_lens, scale)
    out_t, lse_t = backend.causal_attention(q, tail_k, tail_v, scale)
    ours = backend.merge_partials(out_c, lse_c, out_t, lse_t)
    ref = _dense_masked(q, keys, values, keep, tail_k, tail_v, scale)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_empty_context_head_contributes_nothing():
    h, d = 2, 8
    q = torch.randn(h, 1, d)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    backend = backends.REFERENCE
    out, lse = backend.ragged_attention(q, torch.empty(0, d), torch.empty(0, d), cu, 0.3)
    assert torch.isneginf(lse).all() and (out == 0).all()
    out_t, lse_t = backend.causal_attention(q, torch.randn(h, 3, d), torch.randn(h, 3, d), 0.3)
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


def test_a_backend_is_chosen_by_name_and_unknown_names_are_refused():
    assert backends.build_backend("auto", torch.device("cpu")).name == "sdpa"
    assert not backends.build_backend("reference").gpu_kernels
    with pytest.raises(ValueError, match="unknown attention backend"):
        backends.build_backend("magic")


def test_each_engine_attends_with_its_own_backend(tiny_model_dir):
    """Two engines, two backends, one process: nothing global decides."""
    from service.config import EngineConfig
    from service.engine.kvzip_engine import KVzipEngine

    def load(name):
        config = EngineConfig(str(tiny_model_dir), device="cpu", dtype="float32")
        return KVzipEngine.load(replace(config, attention_backend=name))

    a, b = load("reference"), load("sdpa")
    assert (a.backend.name, b.backend.name) == ("reference", "sdpa")
    doc = a.encode_document("The harbour master counts the boats at dawn. " * 4)
    compression = CompressionConfig("kvzip", 1.0, 16)  # keep all: compare every score
    got_a, _ = a.ingest(doc, compression)
    got_b, _ = b.ingest(doc, compression)
    assert a.backend.name == "reference"  # loading b changed nothing of a
    for la, lb in zip(got_a.layers, got_b.layers, strict=True):
        torch.testing.assert_close(la.scores, lb.scores, atol=1e-5, rtol=1e-4)
    assert a.use_backend("sdpa").name == "sdpa" and a.config.attention_backend == "sdpa"
    assert b.backend.name == "sdpa"
