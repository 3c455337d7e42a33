"""KVzip scores against an independent brute-force oracle (KVZIP.md, correctness checks)."""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from service.config import CompressionConfig
from service.engine.prompt import build_layout

TEXT = (
    "Marie Curie was a physicist and chemist who conducted pioneering research on "
    "radioactivity. She was the first woman to win a Nobel Prize. "
) * 4


def _record_qk(model_dir):
    """A second copy of the model whose attention records post-RoPE q and k per layer."""
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def recording(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        store[module.layer_idx] = (q[0].clone(), k[0].clone())
        group = q.shape[1] // k.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            q,
            k.repeat_interleave(group, 1),
            v.repeat_interleave(group, 1),
            is_causal=True,
            scale=scaling,
        )
        return out.transpose(1, 2), None

    AttentionInterface.register("test_record", recording)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="test_record")
    return model.eval(), store


def _brute_force(q, k, s, a, b, n, scale, group):
    """Explicit index sets: prefix ∪ chunk ∪ x_k[:i+1] for every query head and query."""
    hq, total, _ = q.shape
    t = total - (s + n)
    best = torch.zeros(hq // group, b - a, dtype=torch.float64)
    for j in range(hq):
        h = j // group
        for i in range(t):
            keys = list(range(s)) + list(range(s + a, s + b)) + list(range(s + n, s + n + i + 1))
            logits = (k[h, keys].double() @ q[j, s + n + i].double()) * scale
            p = torch.softmax(logits, 0)[s : s + (b - a)]
            best[h] = torch.maximum(best[h], p)
    return best


def test_scores_match_brute_force(tiny_engine, tiny_model_dir):
    engine = tiny_engine
    doc = engine.encode_document(TEXT)
    m = 40
    full = engine.prefill_context(doc, CompressionConfig("kvzip", 0.3, m))
    scored = engine.score(full)
    model, store = _record_qk(tiny_model_dir)
    layout = build_layout(engine.tokenizer)
    s, n, ids = full.prefix_len, full.context_len, doc.all_ids
    assert n > 2 * m  # several chunks, overlap prompts included
    for a in range(0, n, m):
        b = min(a + m, n)
        x = layout.reconstruction_ids(ids[s + a : s + b], ids[s + a - m : s + a] if a else None)
        with torch.no_grad():
            model(torch.tensor([ids + x]))
        for layer_idx, layer in enumerate(scored.layers):
            q, k = store[layer_idx]
            group = q.shape[0] // k.shape[0]
            oracle = _brute_force(q, k, s, a, b, n, q.shape[-1] ** -0.5, group)
            ours = layer.scores.view(layer.n_heads, -1)[:, s + a : s + b].double()
            torch.testing.assert_close(ours, oracle, atol=2e-5, rtol=1e-3)


def test_one_chunk_scores_do_not_depend_on_chunk_size(tiny_engine):
    doc = tiny_engine.encode_document(TEXT)
    n = len(doc.context_ids)
    results = []
    for m in (n, n + 1, 2000):
        full = tiny_engine.prefill_context(doc, CompressionConfig("kvzip", 0.3, m))
        results.append(torch.cat([layer.scores for layer in tiny_engine.score(full).layers]))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_prefix_is_never_scored(tiny_engine):
    doc = tiny_engine.encode_document(TEXT)
    full = tiny_engine.prefill_context(doc, CompressionConfig("kvzip", 0.3, 50))
    for layer in tiny_engine.score(full).layers:
        scores = layer.scores.view(layer.n_heads, -1)
        assert torch.isinf(scores[:, : full.prefix_len]).all()
        assert torch.isfinite(scores[:, full.prefix_len :]).all()
        assert (scores[:, full.prefix_len :] > 0).all()
