"""Global non-uniform top-k selection: exact budget, protected prefix, re-selection."""

from __future__ import annotations

import math

import pytest
import torch

from service.compression.selection import select
from service.config import CompressionConfig

TEXT = "Alpha beta gamma delta. The river flows to the sea, and the sea to the sky. " * 12


@pytest.fixture(scope="module")
def scored(tiny_engine):
    doc = tiny_engine.encode_document(TEXT)
    full = tiny_engine.prefill_context(doc, CompressionConfig("kvzip", 0.3, 100))
    return tiny_engine.score(full)


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_exact_budget_and_protected_prefix(scored, ratio):
    out = select(scored, ratio)
    assert out.kept_pairs == math.floor(ratio * scored.total_pairs + 1e-9)
    for layer in out.layers:
        for h in range(layer.n_heads):
            pos = layer.positions[layer.head(h)]
            assert pos[: scored.prefix_len].tolist() == list(range(scored.prefix_len))
            assert torch.all(pos[1:] > pos[:-1])  # original order kept


def test_kept_pairs_are_the_global_top_scores(scored):
    out = select(scored, 0.3)
    kept = torch.cat([layer.scores for layer in out.layers])
    kept_ctx = kept[torch.isfinite(kept)]
    every = torch.cat([layer.scores for layer in scored.layers])
    every = every[torch.isfinite(every)]
    threshold = kept_ctx.min()
    assert int((every > threshold).sum()) <= kept_ctx.numel() <= int((every >= threshold).sum())
    budgets = {int(layer.lens.sum()) for layer in out.layers}
    assert len(budgets) > 1  # non-uniform: layers get different budgets


def test_kept_keys_are_the_original_keys(scored):
    out = select(scored, 0.3)
    for full_layer, layer in zip(scored.layers, out.layers, strict=True):
        keys, _ = full_layer.dense()
        for h in range(layer.n_heads):
            rows = layer.head(h)
            assert torch.equal(layer.keys[rows], keys[h, layer.positions[rows].long()])


def test_query_time_reselection_equals_direct_selection(scored):
    direct = select(scored, 0.2)
    via = select(select(scored, 0.3), 0.2)
    for a, b in zip(direct.layers, via.layers, strict=True):
        assert torch.equal(a.cu_lens, b.cu_lens)
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys, b.keys)
