"""Global non-uniform top-k selection (KVZIP.md, "Selection").

`ratio` is the KEPT fraction of context pairs. All L*H*n context scores compete for
floor(ratio * L*H*n) slots, so layers and heads get different budgets. The protected
prefix (score +inf) is always kept and never counted. Exactly the budget is kept; ties
are broken by pair order (layer, then KV head, then position: the earlier pair wins), which
a compressed context preserves. So re-selecting a stored context at a smaller ratio gives
exactly the direct selection, whatever the ties (methods like `streaming` or `kvzip_head`
give many pairs the same score).
"""

from __future__ import annotations

import math

import torch

from service.engine.kvcache import CompressedContext


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
