"""Decoding over the compressed context: ratio 1.0 reproduces the uncompressed model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from service.config import CompressionConfig
from service.types import SamplingParams

TEXT = "The lighthouse keeper wrote in his log every night. The storm came on a Tuesday. " * 6


def _reference_greedy(model_dir, ids, steps, eos):
    """transformers' own sdpa attention + DynamicCache, greedy, same stop rule."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=sorted(eos),
        pad_token_id=sorted(eos)[0],
    )[0, len(ids) :].tolist()
    return [t for t in out if t not in eos]


def test_ratio_one_reproduces_uncompressed_greedy_tokens(tiny_engine, tiny_model_dir):
    doc = tiny_engine.encode_document(TEXT)
    question = tiny_engine.encode_question("When did the storm come?")
    params = SamplingParams(max_new_tokens=12)
    expected = _reference_greedy(tiny_model_dir, doc.all_ids + question, 12, tiny_engine.eos_ids)
    assert len(expected) >= 3
    for compression in (CompressionConfig("none", 1.0), CompressionConfig("kvzip", 1.0, 64)):
        ctx, _ = tiny_engine.ingest(doc, compression)
        assert ctx.kept_pairs == ctx.total_pairs
        assert list(tiny_engine.generate(ctx, question, params)) == expected


def test_compressed_context_is_not_modified_by_decoding(tiny_engine):
    doc = tiny_engine.encode_document(TEXT)
    ctx, _ = tiny_engine.ingest(doc, CompressionConfig("kvzip", 0.3, 64))
    before = [layer.keys.clone() for layer in ctx.layers]
    question = tiny_engine.encode_question("Who wrote the log?")
    first = list(tiny_engine.generate(ctx, question, SamplingParams(max_new_tokens=6)))
    second = list(tiny_engine.generate(ctx, question, SamplingParams(max_new_tokens=6)))
    assert first == second
    assert all(torch.equal(a, b.keys) for a, b in zip(before, ctx.layers, strict=True))


def test_sampling_is_seeded_and_respects_max_new_tokens(tiny_engine):
    doc = tiny_engine.encode_document(TEXT)
    ctx, _ = tiny_engine.ingest(doc, CompressionConfig("none", 1.0))
    question = tiny_engine.encode_question("Tell me a story.")
    params = SamplingParams(max_new_tokens=5, temperature=1.5, top_p=0.9, seed=7)
    a = list(tiny_engine.generate(ctx, question, params))
    b = list(tiny_engine.generate(ctx, question, params))
    assert a == b and len(a) <= 5


def test_batched_static_decoding_equals_one_by_one(tiny_engine):
    """Three different questions decoded together through the static tail give exactly
    the tokens each one gets alone through the dynamic tail (greedy)."""
    doc = tiny_engine.encode_document(TEXT)
    ctx, _ = tiny_engine.ingest(doc, CompressionConfig("kvzip", 0.3, 64))
    questions = ["Who wrote the log?", "When did the storm come?", "Why?"]
    prompts = [tiny_engine.encode_question(q) for q in questions]
    params = SamplingParams(max_new_tokens=8)
    alone = [list(tiny_engine.generate(ctx, p, params)) for p in prompts]
    steps = list(tiny_engine.generate_batch(ctx, prompts, params, use_graph=False))
    together = [[s[b] for s in steps if s[b] is not None] for b in range(3)]
    assert together == alone


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(tiny_engine):
    """The torch.compile'd decode step (CPU Inductor here) decodes exactly like the eager
    step (fp32, greedy), without falling back."""
    from service.engine.batch_decode import BatchDecoder

    doc = tiny_engine.encode_document(TEXT)
    ctx, _ = tiny_engine.ingest(doc, CompressionConfig("kvzip", 0.3, 64))
    prompts = [tiny_engine.encode_question(q) for q in ("Who wrote the log?", "Why?")]
    runs = []
    for compiled in (False, True):
        decoder = BatchDecoder(tiny_engine.model, ctx, prompts, 8, set(), False, compiled)
        with torch.inference_mode():
            runs.append(list(decoder.run(SamplingParams(max_new_tokens=8))))
        assert decoder.compiled == compiled
    assert runs[1] == runs[0] and len(runs[0]) == 8
