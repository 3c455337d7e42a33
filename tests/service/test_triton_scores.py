"""The Triton scoring and merge kernels (service.engine.backends.triton_scores, triton_merge)
replace, on CPU under the Triton interpreter (TRITON_INTERPRET=1).

The kernels' module is (re)imported with the variable set, and it stays set while this
file's tests run (the interpreter reads it at run time too), so any test order works; on a
CUDA machine this file is skipped (test_gpu.py runs the compiled kernels there).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("compiled kernels are tested in test_gpu.py", allow_module_level=True)


def _interpreted_module(name):
    """Import triton (its own jit'd helpers too) and the kernels with the variable set."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.max, InterpretedFunction):
            pytest.skip(
                "triton was imported before without TRITON_INTERPRET", allow_module_level=True
            )
        if name in sys.modules:
            return importlib.reload(sys.modules[name])
        return importlib.import_module(name)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


ts = _interpreted_module("service.engine.backends.triton_scores")
tm = _interpreted_module("service.engine.backends.triton_merge")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    """The interpreter reads the variable while kernels run too; restored after the file."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = saved


from service.compression import reconstruction  # noqa: E402
from service.compression.scorers import kvzip_plus  # noqa: E402
from service.config import CompressionConfig  # noqa: E402
from service.engine.backends import REFERENCE  # noqa: E402


@pytest.fixture
def on_triton(monkeypatch):
    """Route scoring through the (interpreted) Triton kernels, as on the CUDA backend."""
    monkeypatch.setitem(sys.modules, "service.engine.backends.triton_scores", ts)
    monkeypatch.setattr(reconstruction, "use_triton", lambda q, backend: True)
    monkeypatch.setattr(kvzip_plus, "use_triton", lambda q, backend: True)
    for name in ("BLOCK_R", "LSE_BLOCK_R", "LSE_BLOCK_N"):  # fewer interpreted steps
        monkeypatch.setattr(ts, name, 256)


def _inputs(h, g, t, d, m, s, start, dtype, seed=0):
    """q (Hq, T, d) as a transposed view; a chunk as a strided slice of (H, S, d) keys."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h * g, d, generator=gen).to(dtype).transpose(0, 1)
    keys = torch.randn(h, s, d, generator=gen).to(dtype)
    lse = torch.randn(h * g, t, generator=gen) * 0.5 + 4.0
    return q, keys, keys[:, start : start + m], lse


def _exact_max_logits(q, chunk, shift, scale, per_query_head=False):
    """fp64 oracle of max_r (q.k * scale - shift[r])."""
    hq, t, d = q.shape
    h, m, _ = chunk.shape
    logits = torch.einsum("jtd,jkd->jtk", q.double(), chunk.double().repeat_interleave(hq // h, 0))
    logits = logits * scale - shift.double().unsqueeze(-1)
    best = logits.amax(dim=1)  # (Hq, m)
    return best if per_query_head else best.view(h, hq // h, m).amax(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "h,g,t,d,m,splits",
    [(2, 3, 37, 16, 70, None), (1, 4, 50, 24, 129, 3), (2, 1, 5, 32, 7, 2), (3, 2, 1, 16, 64, 1)],
)
def test_max_logits_matches_oracle(dtype, h, g, t, d, m, splits):
    q, _, chunk, lse = _inputs(h, g, t, d, m, m + 40, 17, dtype)
    for per_head in (False, True):
        got = ts.max_logits(q, chunk, lse, d**-0.5, per_query_head=per_head, n_splits=splits)
        want = _exact_max_logits(q, chunk, lse, d**-0.5, per_query_head=per_head)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_scores_match_torch_local_scores(dtype):
    h, g, t, d, m = 2, 4, 45, 16, 83
    q, _, chunk, lse = _inputs(h, g, t, d, m, 200, 60, dtype, seed=1)
    got = ts.chunk_scores(q, chunk, lse, d**-0.5)
    want = reconstruction._torch_local_scores(q, chunk, lse, d**-0.5)
    # the torch path rounds its logits to the input dtype; the kernel keeps fp32
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n1,n2", [(5, 70), (0, 65), (64, 1), (0, 0)])
def test_range_lse_matches_logsumexp(dtype, n1, n2):
    h, g, t, d = 2, 3, 29, 16
    q, keys, _, _ = _inputs(h, g, t, d, 1, 200, 0, dtype, seed=2)
    first, second = keys[:, :n1], keys[:, 100 : 100 + n2]
    got = ts.range_lse(q, first, second, 0.3)
    both = torch.cat([first, second], 1).double().repeat_interleave(g, 0)
    want = torch.logsumexp(q.double() @ both.transpose(1, 2) * 0.3, dim=-1)
    if n1 + n2 == 0:
        assert torch.isneginf(got).all()
    else:
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 9, 16), (2, 6, 9, 16), (3, 1, 24)])
def test_merge_matches_merge_partials(dtype, shape):
    from service.engine.backends import merge_partials  # the torch path

    gen = torch.Generator().manual_seed(3)
    out_a = torch.randn(shape, generator=gen).to(dtype)
    out_b = torch.randn(shape, generator=gen).to(dtype).transpose(-2, -3)
    out_b = out_b.contiguous().transpose(-2, -3)  # strided, last dim contiguous
    lse_a = torch.randn(shape[:-1], generator=gen) * 3
    lse_b = torch.randn(shape[:-1], generator=gen) * 3
    lse_a.view(-1)[:2] = float("-inf")  # an empty context head
    got = tm.merge(out_a, lse_a, out_b, lse_b)
    want = merge_partials(out_a, lse_a, out_b, lse_b)
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    if len(shape) == 4:  # laid out as (B, T, Hq, d): the model's next transpose is free
        assert got.transpose(1, 2).is_contiguous()


def test_local_scores_without_lse_uses_range_lse(on_triton):
    """The fallback (no model normalisers): range_lse + causal tail + kernel == torch."""
    h, g, t, d, m = 2, 3, 21, 16, 50
    q, keys, _, _ = _inputs(h, g, t, d, 1, 120, 0, torch.float32, seed=4)
    prefix, chunk, tail = keys[:, :6], keys[:, 30 : 30 + m], keys[:, 100 : 100 + t]
    got = reconstruction.local_scores(q, prefix, chunk, tail, d**-0.5)
    cat = torch.cat([prefix, chunk], 1)
    _, lse_ctx = REFERENCE.ragged_attention(
        q, cat.reshape(-1, d), cat.reshape(-1, d), torch.arange(h + 1, dtype=torch.int32) * 56, 0.25
    )
    _, lse_tail = REFERENCE.causal_attention(q, tail, tail, 0.25)
    want = reconstruction._torch_local_scores(q, chunk, torch.logaddexp(lse_ctx, lse_tail), 0.25)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


TEXT = "The tide comes in twice a day at the old harbour, and the boats wait for it. " * 2


def test_engine_scores_equal_with_triton_kernels(tiny_engine, request):
    """A whole scoring run (two chunks, prefix + chunk lse from range_lse) gives the same
    scores through the kernels as through the torch reference path."""
    doc = tiny_engine.encode_document(TEXT)
    full = tiny_engine.prefill_context(doc, CompressionConfig("kvzip", 0.3, 32))
    assert full.context_len > 32  # two chunks
    want = [x.scores for x in tiny_engine.score(full).layers]
    request.getfixturevalue("on_triton")
    got = [x.scores for x in tiny_engine.score(full).layers]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_plus_scores_equal_with_triton_kernel(request):
    """KVzip+ on the per-query-head kernel == its torch path (a zero hidden norm included)."""
    h, g, t, d, m = 2, 3, 19, 16, 45
    q, keys, chunk, lse = _inputs(h, g, t, d, m, 100, 20, torch.float32, seed=5)
    norms = torch.rand(t) + 0.5
    norms[3] = 0.0
    value_norms = torch.rand(h, g, m) + 0.1
    want = kvzip_plus.plus_scores(q, chunk, lse, d**-0.5, norms, value_norms)
    request.getfixturevalue("on_triton")
    got = kvzip_plus.plus_scores(q, chunk, lse, d**-0.5, norms, value_norms)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
