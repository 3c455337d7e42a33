"""The service's kvzip_plus (and kvzip) scores against the float64 reference written from the
papers' definitions (bench/quality/kvzip_plus_reference.py), on the tiny random model."""

from __future__ import annotations

import pytest
import torch

from bench.quality.kvzip_plus_reference import Chunk, float64_copy, reference_scores
from service.config import CompressionConfig
from service.engine.prompt import build_layout

TEXT = (
    "The lighthouse keeper logged 31 ships in March, 17 of them whalers bound for the "
    "northern grounds; the rest carried timber, salt and mail. "
) * 3


@pytest.fixture(scope="module")
def model64(tiny_engine):
    return float64_copy(tiny_engine.model)


def _chunks(engine, doc, m: int) -> list[Chunk]:
    layout = build_layout(engine.tokenizer)
    ids, s, n = doc.all_ids, len(doc.prefix_ids), len(doc.context_ids)
    out = []
    for a in range(0, n, m):
        b = min(a + m, n)
        previous = ids[s + a - m : s + a] if a else None
        out.append(Chunk(a, b, tuple(layout.reconstruction_ids(ids[s + a : s + b], previous))))
    return out


def _service(engine, doc, method: str, m: int) -> list[torch.Tensor]:
    full = engine.prefill_context(doc, CompressionConfig(method, 1.0, m))
    scored = engine.score(full, method=method)
    s = scored.prefix_len
    return [layer.scores.view(layer.n_heads, -1)[:, s:].double() for layer in scored.layers]


@pytest.mark.parametrize("m", [40, 2000])
@pytest.mark.parametrize("method", ["kvzip_plus", "kvzip"])
def test_service_scores_match_the_float64_reference(tiny_engine, model64, method, m):
    """Several chunks (m=40: overlap prompts, local softmax) and one (m=2000: the whole
    sequence in one softmax, the KVzap recipe's setting): the same scores."""
    doc = tiny_engine.encode_document(TEXT)
    chunks = _chunks(tiny_engine, doc, m)
    assert (len(chunks) > 2) == (m == 40)
    ref = reference_scores(model64, doc.all_ids, len(doc.prefix_ids), chunks, method)
    ours = _service(tiny_engine, doc, method, m)
    assert len(ours) == len(ref)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-7)


def test_copy_queries_differ_from_all_queries(tiny_engine, model64):
    """The paper's KVzap targets max over the copied tokens only; KVzip over all of x_k.
    The two are different functions (so the test above would notice a switch)."""
    doc = tiny_engine.encode_document(TEXT)
    chunks = _chunks(tiny_engine, doc, 2000)
    s = len(doc.prefix_ids)
    every = reference_scores(model64, doc.all_ids, s, chunks, "kvzip_plus")
    copy = reference_scores(model64, doc.all_ids, s, chunks, "kvzip_plus-copy")
    assert all((a >= c).all() for a, c in zip(every, copy, strict=True))
    assert any((a > c * (1 + 1e-6)).any() for a, c in zip(every, copy, strict=True))
