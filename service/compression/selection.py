"""Global non-uniform top-k selection (KVZIP.md, "Selection").

`ratio` is the KEPT fraction of context pairs. All L*H*n context scores compete for
floor(ratio * L*H*n) slots, so layers and heads get different budgets. The protected
prefix (score +inf) is always kept and never counted. Exactly the budget is kept; ties
are broken by pair order (layer, then KV head, then position: the earlier pair wins), which
a compressed context preserves. So re-selecting a stored context at a smaller ratio gives
exactly the direct selection, whatever the ties (methods like `streaming` or `kvzip_head`
give many pairs the same score).

With a threshold instead of a ratio (`compression.threshold`, method kvzap), every pair
scored >= exp(threshold) is kept, plus the most recent WINDOW context tokens of every head
(`threshold_select`); the context then reports the ratio it achieved.
"""

from __future__ import annotations

import math

import torch

from service.config import CompressionConfig
from service.engine.kvcache import CompressedContext, RaggedLayer

WINDOW = 128
"""Threshold mode: the most recent context tokens every head keeps."""
WINDOW_SCORE = 1e30
"""Stored score of the recent window in threshold mode: above any scorer's finite score."""
THRESHOLD_MAX = 65.0
"""A threshold above every score still keeps the window: exp(65) < WINDOW_SCORE."""


def compress(full: CompressedContext, compression: CompressionConfig) -> CompressedContext:
    """The selection `compression` asks for: its threshold when set, else its ratio."""
    if compression.threshold is None:
        return select(full, compression.ratio)
    return threshold_select(full, compression.threshold)


def budget(ratio: float, total_pairs: int) -> int:
    """Number of context pairs kept at `ratio` (floor, as the reference)."""
    return math.floor(ratio * total_pairs + 1e-9)


def select(context: CompressedContext, ratio: float) -> CompressedContext:
    """Keep the top floor(ratio * total_pairs) context pairs over all layers and heads.

    Works on a full context as well as on an already compressed one (query-time ratio):
    a stored context at ratio r answers at r' <= r by pure re-selection of its scores.
    """
    k = budget(ratio, context.total_pairs)
    flat = torch.cat([layer.scores for layer in context.layers])
    is_prefix = torch.isinf(flat)
    candidates = flat.masked_fill(is_prefix, float("-inf"))
    keep = is_prefix.clone()
    if k > 0:
        order = torch.sort(candidates, descending=True, stable=True).indices
        keep[order[:k]] = True
    layers, offset = [], 0
    for layer in context.layers:
        n = layer.scores.numel()
        layers.append(layer.keep(keep[offset : offset + n]))
        offset += n
    return context.with_layers(tuple(layers), ratio=ratio)


def threshold_select(
    full: CompressedContext, threshold: float, window: int = WINDOW
) -> CompressedContext:
    """Keep pairs scored >= exp(threshold) and the last `window` context tokens.

    full: an all-kept scored context (every head holds s + n pairs). The recent window is
    stored with WINDOW_SCORE, so a later query-time re-selection keeps it first too.
    The result's ratio is the achieved kept fraction of the context pairs.
    """
    s, n = full.prefix_len, full.context_len
    cut = math.exp(min(threshold, THRESHOLD_MAX))  # compared in float64
    layers, kept = [], 0
    for layer in full.layers:
        h = layer.n_heads
        scores = layer.scores.view(h, -1).clone()
        scores[:, max(s, s + n - window) :] = WINDOW_SCORE
        keep = scores.double() >= cut
        uniform = RaggedLayer(
            layer.keys, layer.values, layer.cu_lens, scores.reshape(-1), layer.positions
        )
        layers.append(uniform.keep(keep.reshape(-1)))
        kept += int(keep[:, s:].sum())
    ratio = kept / full.total_pairs if full.total_pairs else 1.0
    return full.with_layers(tuple(layers), ratio=ratio)
