"""CUDA backends against the plain-PyTorch reference, and graph decoding == eager decoding.

Run on a GPU machine: `pytest -m gpu tests/service/test_gpu.py`. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from service.engine.backends import reference
from service.engine.kvcache import RaggedLayer

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


def _flash_module(name: str):
    """The backend module of one flash-kernel backend (`cuda`: PyTorch's kernel;
    `flash_attn`: the flash-attn package, skipped where it is not installed)."""
    from service.engine import backends

    if name not in backends.available_backends():
        pytest.skip(f"backend {name} is not available here (package not installed)")
    import importlib

    return importlib.import_module(f"service.engine.backends.{name}")


@pytest.mark.parametrize("backend", ["cuda", "flash_attn"])
@pytest.mark.parametrize("g,t", [(4, 1), (4, 16), (8, 1), (4, 3), (4, 40), (6, 500)])
@pytest.mark.parametrize("n", [37, 3000, 70000])
def test_cuda_ragged_attention_matches_reference(g, t, n, backend):
    cuda = _flash_module(backend)
    h, d = 8, 128
    layer = _ragged(h, n, d, 0.3, torch.bfloat16, seed=n + t)
    q = torch.randn(h * g, t, d, device="cuda", dtype=torch.bfloat16)
    out, lse = cuda.ragged_attention(q, layer.keys, layer.values, layer.cu_lens, d**-0.5)
    ref_out, ref_lse = reference.ragged_attention(
        q, layer.keys, layer.values, layer.cu_lens, d**-0.5
    )
    assert _rel(out, ref_out) < 2e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("backend", ["cuda", "flash_attn"])
@pytest.mark.parametrize("t,s", [(1, 1), (1, 50), (7, 7), (5, 300), (2048, 2048), (1000, 5000)])
def test_cuda_causal_attention_matches_reference(t, s, backend):
    cuda = _flash_module(backend)
    hq, h, d = 32, 8, 128
    q = torch.randn(hq, t, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(h, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(h, s, d, device="cuda", dtype=torch.bfloat16)
    out, lse = cuda.causal_attention(q, k, v, d**-0.5)
    ref_out, ref_lse = reference.causal_attention(q, k, v, d**-0.5)
    assert _rel(out, ref_out) < 2e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


def test_auto_backend_on_this_gpu():
    """auto on this GPU: cudnn on Hopper+ (when this torch has it), else a flash backend."""
    from service.engine import backends

    chosen = backends.build_backend("auto", torch.device("cuda"))
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    if hopper and "cudnn" in backends.available_backends():
        assert chosen.name == "cudnn"
    else:
        assert chosen.name in ("flash_attn", "cuda")
    assert chosen.gpu_kernels


@pytest.mark.parametrize("backend", ["cuda", "flash_attn"])
def test_empty_heads_give_neg_inf_lse(backend):
    cuda = _flash_module(backend)
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
    from service.engine.kvzip_engine import KVzipEngine
    from service.types import SamplingParams

    engine = KVzipEngine.load(
        EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16")
    )
    doc = engine.encode_document("The tide comes in twice a day at the old harbour. " * 40)
    ctx, _ = engine.ingest(doc, CompressionConfig("kvzip", 0.3, 256))
    prompts = [engine.encode_question(q) for q in ("When?", "Where is the harbour?", "Why?")]
    params = SamplingParams(max_new_tokens=12)
    graph = list(engine.generate_batch(ctx, prompts, params, use_graph=True))
    eager = list(engine.generate_batch(ctx, prompts, params, use_graph=False))
    assert graph == eager and len(graph) >= 3


def test_compiled_graph_step_matches_eager_step(tiny_model_dir):
    """torch.compile'd + captured decode step: same logits as the eager step, no fallback."""
    from service.config import CompressionConfig, EngineConfig
    from service.engine.batch_decode import BatchDecoder
    from service.engine.kvzip_engine import KVzipEngine

    engine = KVzipEngine.load(
        EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16")
    )
    doc = engine.encode_document("The tide comes in twice a day at the old harbour. " * 40)
    ctx, _ = engine.ingest(doc, CompressionConfig("kvzip", 0.3, 256))
    prompts = [engine.encode_question(q) for q in ("When?", "Where is the harbour?")]
    traces = []
    for use_graph, compiled in ((False, False), (True, True)):
        decoder = BatchDecoder(engine.model, ctx, prompts, 8, set(), use_graph, compiled)
        with torch.inference_mode():
            logits = [decoder.prefill()]
            for step in range(6):
                tokens = torch.full((2,), 100 + step, device="cuda")
                logits.append(decoder.step(tokens).clone())
        traces.append(torch.stack(logits))
        assert decoder.compiled == compiled  # the compiled step did not fall back
    assert _rel(traces[1], traces[0]) < 2e-2


@pytest.mark.parametrize("batch,t,n", [(1, 1, 5000), (4, 1, 70000), (16, 1, 3000), (2, 3, 900)])
def test_fused_static_decode_matches_reference(batch, t, n):
    """Context + static tail + merge in one pass == reference context ⊕ reference tail."""
    from service.engine.backends import cuda, merge_partials

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


# -- tensor_blob: pack/unpack through the pinned staging ring ----------------------------------


def _blob_tensors(n_big: int, seed: int) -> dict[str, torch.Tensor]:
    """KV-like tensors on the GPU: big bf16 blocks plus small, unaligned int32/fp32 ones."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = {}
    for i in range(3):
        n = n_big + 37 * i  # rows * 128 * 2 bytes: windows split tensors mid-way
        out[f"layers.{i}.keys"] = torch.randn(n, 128, device="cuda", generator=g).bfloat16()
        out[f"layers.{i}.values"] = torch.randn(n, 128, device="cuda", generator=g).bfloat16()
        out[f"layers.{i}.cu_lens"] = torch.arange(9, device="cuda", dtype=torch.int32)  # 36 B
        out[f"layers.{i}.scores"] = torch.rand(n, device="cuda", generator=g)
        out[f"layers.{i}.positions"] = torch.arange(n + 1, device="cuda", dtype=torch.int32)
    out["context_ids"] = torch.arange(1001, dtype=torch.int32)  # on the CPU: mixed devices
    return out


@pytest.mark.parametrize("n_big", [1, 333, 200_003])  # up to ~330 MB: many 32 MiB windows
def test_tensor_blob_round_trip_on_cuda_is_bit_exact(n_big):
    from safetensors.torch import load

    from service.engine.tensor_blob import pack, unpack

    tensors = _blob_tensors(n_big, seed=n_big)
    blob = pack(tensors, {"m": "x"})
    assert blob == pack({k: v.cpu() for k, v in tensors.items()}, {"m": "x"})  # same bytes
    for source in (blob, memoryview(blob)):
        back = unpack(source, "cuda")
        for name, t in tensors.items():
            assert back[name].is_cuda and back[name].data_ptr() % 16 == 0
            assert torch.equal(back[name].cpu(), t.cpu()), name
    if n_big < 1000:
        reference = load(blob)
        assert all(torch.equal(reference[k], v.cpu()) for k, v in tensors.items())


def test_tensor_blob_small_ring_on_cuda_back_to_back():
    """Many tiny windows, calls back to back: a slot is never overwritten while in DMA."""
    from service.engine.tensor_blob import _download, _Span, _StagingRing, _upload

    ring = _StagingRing(3, 4099)
    g = torch.Generator(device="cuda").manual_seed(1)
    sources = [torch.randint(0, 256, (50_001 + i,), device="cuda", generator=g,
                             dtype=torch.uint8) for i in range(4)]  # fmt: skip
    outs = [_upload(s.cpu(), torch.device("cuda", torch.cuda.current_device()), ring)
            for s in sources]  # fmt: skip
    for s, o in zip(sources, outs, strict=True):
        assert torch.equal(s, o)
    spans, start = [], 0
    for s in sources:
        spans.append(_Span(start, s))
        start += s.numel()
    host = torch.empty(start, dtype=torch.uint8)
    _download(host, spans, sources[0].device, ring)
    assert torch.equal(host, torch.cat(sources).cpu())


# --- Triton scoring and merge kernels (service.engine.backends.triton_scores, triton_merge) -----


def _score_inputs(h, g, t, d, m, s, start, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(t, h * g, d, device="cuda", generator=gen).to(dtype).transpose(0, 1)
    keys = torch.randn(h, s, d, device="cuda", generator=gen).to(dtype)
    lse = torch.randn(h * g, t, device="cuda", generator=gen) * 0.5 + 6.0
    return q, keys, keys[:, start : start + m], lse


def _exact_max_logits(q, chunk, shift, scale, per_query_head=False):
    hq = q.shape[0]
    h, m, _ = chunk.shape
    k = chunk.double().repeat_interleave(hq // h, 0)
    best = (torch.einsum("jtd,jkd->jtk", q.double(), k) * scale - shift.double()[..., None]).amax(1)
    return best if per_query_head else best.view(h, hq // h, m).amax(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "h,g,t,d,m",
    [(8, 4, 2100, 128, 2000), (8, 4, 37, 128, 70), (2, 7, 5, 64, 1), (4, 2, 300, 80, 999)],
)
def test_triton_max_logits_match_reference(dtype, h, g, t, d, m):
    from service.engine.backends import triton_scores

    q, _, chunk, lse = _score_inputs(h, g, t, d, m, m + 3000, 1234, dtype, seed=t + m)
    for per_head in (False, True):
        got = triton_scores.max_logits(q, chunk, lse, d**-0.5, per_query_head=per_head)
        want = _exact_max_logits(q, chunk, lse, d**-0.5, per_query_head=per_head)
        torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_chunk_scores_match_torch_path(dtype):
    from service.compression.reconstruction import _torch_local_scores
    from service.engine.backends import triton_scores

    h, g, t, d, m = 8, 4, 2048, 128, 2000
    q, _, chunk, lse = _score_inputs(h, g, t, d, m, 9000, 4000, dtype, seed=7)
    got = triton_scores.chunk_scores(q, chunk, lse, d**-0.5)
    want = _torch_local_scores(q, chunk, lse, d**-0.5)
    # the torch path rounds its logits to bf16 before the upcast; the kernel keeps fp32
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n1,n2", [(4, 2000), (0, 2000), (300, 77), (0, 0)])
def test_triton_range_lse_matches_reference(dtype, n1, n2):
    from service.engine.backends import triton_scores

    h, g, t, d = 8, 4, 530, 128
    q, keys, _, _ = _score_inputs(h, g, t, d, 1, 6000, 0, dtype, seed=n1 + n2)
    first, second = keys[:, :n1], keys[:, 3000 : 3000 + n2]
    got = triton_scores.range_lse(q, first, second, d**-0.5)
    if n1 + n2 == 0:
        assert torch.isneginf(got).all()
        return
    both = torch.cat([first, second], 1).reshape(-1, d)
    cu = torch.arange(h + 1, dtype=torch.int32, device="cuda") * (n1 + n2)
    _, want = reference.ragged_attention(q, both, both, cu, d**-0.5)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("shape", [(32, 1, 128), (32, 2000, 128), (3, 32, 517, 128), (2, 8, 5, 64)])
def test_triton_merge_matches_torch_merge(shape):
    from service.engine.backends import triton_merge

    out_a = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    out_b = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    out_b = out_b.transpose(-2, -3).contiguous().transpose(-2, -3)
    lse_a = torch.randn(shape[:-1], device="cuda") * 3
    lse_b = torch.randn(shape[:-1], device="cuda") * 3
    lse_a.view(-1)[:5] = float("-inf")
    got = triton_merge.merge(out_a, lse_a, out_b, lse_b)
    lse = torch.logaddexp(lse_a, lse_b)
    want = (
        out_a.float() * torch.exp(lse_a - lse)[..., None]
        + out_b.float() * torch.exp(lse_b - lse)[..., None]
    )
    assert got.shape == out_a.shape and got.dtype == out_a.dtype
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("method", ["kvzip", "kvzip_plus"])
def test_engine_scores_cuda_backend_match_reference_backend(tiny_model_dir, method):
    """Whole scoring runs on CUDA: the cuda backend (flash + Triton scoring kernels + fused
    merge) against the reference backend (plain torch) on the same prefilled context."""
    from service.config import CompressionConfig, EngineConfig
    from service.engine.kvzip_engine import KVzipEngine

    engine = KVzipEngine.load(
        EngineConfig(
            model=str(tiny_model_dir), device="cuda", dtype="bfloat16", attention_backend="cuda"
        )
    )
    assert engine.backend.name == "cuda"
    doc = engine.encode_document("The tide comes in twice a day at the old harbour. " * 40)
    full = engine.prefill_context(doc, CompressionConfig(method, 0.3, 128))
    got = [layer.scores for layer in engine.score(full, method=method).layers]
    engine.use_backend("reference")
    want = [layer.scores for layer in engine.score(full, method=method).layers]
    for a, b in zip(got, want, strict=True):
        finite = a.isfinite()  # the prefix keeps +inf
        assert torch.equal(finite, b.isfinite()) and (a[finite] > 0).all()
        # bf16 model: the two backends round attention outputs differently, so the hidden
        # states (and the scores of later layers) drift a little
        torch.testing.assert_close(a[finite], b[finite], atol=2e-2, rtol=5e-2)


def test_engine_scores_triton_path_match_torch_path(tiny_model_dir, monkeypatch):
    """Same cuda backend, same forward: only the scoring kernels differ."""
    from service.compression import reconstruction
    from service.config import CompressionConfig, EngineConfig
    from service.engine.kvzip_engine import KVzipEngine

    engine = KVzipEngine.load(
        EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16")
    )
    doc = engine.encode_document("The tide comes in twice a day at the old harbour. " * 40)
    full = engine.prefill_context(doc, CompressionConfig("kvzip", 0.3, 128))
    got = torch.cat([layer.scores for layer in engine.score(full).layers])
    monkeypatch.setattr(reconstruction, "use_triton", lambda q, backend: False)
    want = torch.cat([layer.scores for layer in engine.score(full).layers])
    finite = got.isfinite()
    assert torch.equal(finite, want.isfinite())
    torch.testing.assert_close(got[finite], want[finite], atol=1e-2, rtol=5e-2)


def _cudnn():
    from service.engine import backends

    if "cudnn" not in backends.available_backends():
        pytest.skip("no cuDNN attention in this torch build")
    from service.engine.backends import cudnn

    return cudnn


@pytest.mark.parametrize("t,s", [(1, 50), (7, 7), (64, 64), (2048, 2048), (1000, 5000), (300, 301)])
def test_cudnn_causal_attention_matches_reference(t, s):
    cudnn = _cudnn()
    hq, h, d = 32, 8, 128
    q = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16).transpose(0, 1)  # model layout
    k = torch.randn(h, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(h, s, d, device="cuda", dtype=torch.bfloat16)
    out, lse = cudnn.causal_attention(q, k, v, d**-0.5)
    ref_out, ref_lse = reference.causal_attention(q, k, v, d**-0.5)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert _rel(out, ref_out) < 2e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("keep_p", [1.0, 0.3])  # uniform (dense cuDNN call) and ragged (cuda)
@pytest.mark.parametrize("t", [16, 2100])
def test_cudnn_ragged_attention_matches_reference(keep_p, t):
    cudnn = _cudnn()
    h, g, n, d = 8, 4, 3000, 128
    layer = _ragged(h, n, d, keep_p, torch.bfloat16, seed=t)
    q = torch.randn(h * g, t, d, device="cuda", dtype=torch.bfloat16)
    out, lse = cudnn.ragged_attention(
        q, layer.keys, layer.values, layer.cu_lens, d**-0.5, layer.max_len
    )
    ref_out, ref_lse = reference.ragged_attention(
        q, layer.keys, layer.values, layer.cu_lens, d**-0.5
    )
    assert _rel(out, ref_out) < 2e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


def test_engine_scores_cudnn_backend_match_reference_backend(tiny_model_dir):
    """Prefill + KVzip scoring with the cudnn backend against the reference backend."""
    from service.config import CompressionConfig, EngineConfig
    from service.engine.kvzip_engine import KVzipEngine

    _cudnn()
    engine = KVzipEngine.load(
        EngineConfig(
            model=str(tiny_model_dir), device="cuda", dtype="bfloat16", attention_backend="cudnn"
        )
    )
    doc = engine.encode_document("The tide comes in twice a day at the old harbour. " * 40)
    got, _ = engine.ingest(doc, CompressionConfig("kvzip", 1.0, 128))
    engine.use_backend("reference")
    want, _ = engine.ingest(doc, CompressionConfig("kvzip", 1.0, 128))
    for a, b in zip(got.layers, want.layers, strict=True):
        finite = a.scores.isfinite()
        assert torch.equal(finite, b.scores.isfinite())
        torch.testing.assert_close(a.scores[finite], b.scores[finite], atol=2e-2, rtol=5e-2)
        assert _rel(a.keys, b.keys) < 2e-2


def test_rows_step_on_different_contexts_one_launch_equals_grouped(tiny_model_dir):
    """The continuous batch's one-launch multi-context step (pointer table) gives the same
    logits as attending rows grouped by context."""
    from service.config import CompressionConfig, EngineConfig
    from service.engine.kvzip_engine import KVzipEngine
    from service.engine.rows import DecodeRows

    engine = KVzipEngine.load(
        EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16")
    )
    texts = ["The tide comes in twice a day. " * 30, "Owls hunt at night in the wood. " * 55]
    contexts = [
        engine.ingest(engine.encode_document(t), CompressionConfig("kvzip", r, 256))[0]
        for t, r in zip(texts, (0.3, 0.6), strict=True)
    ]
    prompts = [engine.encode_question(q) for q in ("When?", "Who hunts?", "Where?")]
    traces = []
    for fused in (True, False):
        rows = DecodeRows(engine.model)
        for i, prompt in enumerate(prompts):
            rows.add(contexts[i % 2], len(prompt) + 16)
            rows.prefill([prompt])
            rows.activate()
        if not fused:
            rows._table = lambda view: None  # type: ignore[method-assign]
        steps = []
        for step in range(8):  # the same tokens both ways (a random model's argmax is fragile)
            tokens = torch.tensor([100 + step, 200 + step, 300 + step], device="cuda")
            steps.append(rows.step(tokens).clone())
        traces.append(torch.stack(steps))
    assert _rel(traces[0], traces[1]) < 2e-2
