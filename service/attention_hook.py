"""The `kvzip` attention function registered with transformers' AttentionInterface.

The model calls it in every layer with post-RoPE queries and the tail keys/values that
`KVzipCache.update` returned. It attends to the ragged context and to the dense tail,
merges the two by log-sum-exp and, when a scorer is attached, reports the queries on the
side so KVzip scores are computed from the very same tensors.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from service import backends
from service.kvcache import KVzipCache

ATTENTION_NAME = "kvzip"


def kvzip_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kvzip_cache: KVzipCache | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query (B, Hq, T, d), key/value (B, H, S, d) -> output (B, T, Hq, d)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer_idx = int(module.layer_idx)  # type: ignore[arg-type]
    context = None
    if kvzip_cache is not None and kvzip_cache.context is not None:
        context = kvzip_cache.context.layers[layer_idx]
    outs = []
    for b in range(query.shape[0]):
        out, lse = backends.causal_attention(query[b], key[b], value[b], scale)
        lse_c = None
        if context is not None:
            out_c, lse_c = backends.ragged_attention(
                query[b], context.keys, context.values, context.cu_lens, scale
            )
            out = backends.merge_partials(out_c, lse_c, out, lse)
        if kvzip_cache is not None and kvzip_cache.scorer is not None:
            kvzip_cache.scorer.observe(  # type: ignore[attr-defined]
                layer_idx, query[b], context, key[b], scale, lse_c, lse
            )
        outs.append(out)
    return torch.stack(outs).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the function under ATTENTION_NAME (idempotent) and return the name."""
    AttentionInterface.register(ATTENTION_NAME, kvzip_attention)
    return ATTENTION_NAME
