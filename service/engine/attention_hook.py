"""The `kvzip` attention function registered with transformers' AttentionInterface.

The model calls it in every layer with post-RoPE queries and the tail keys/values that
the cache's `update` returned. It attends to the ragged context and to the dense tail,
merges the two by log-sum-exp and, when a scorer is attached, reports the queries on the
side so KVzip scores are computed from the very same tensors.

The attention backend is the engine's: `attach` sets it on every attention module of the
model, where the function finds it (`REFERENCE` on a module nobody attached one to).
`attention_inputs` hands each attention module's input to a callback (forward pre-hooks),
for the scorers that read the hidden states (kvzip_plus, kvzap).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface

from service.engine.backends import REFERENCE, Backend
from service.engine.kvcache import KVzipCache, RaggedLayer
from service.engine.rows import RowsCache
from service.engine.static_cache import StaticKVzipCache, static_tail_attention

ATTENTION_NAME = "kvzip"
BACKEND_ATTRIBUTE = "kvzip_backend"
OnInput = Callable[[int, torch.Tensor], None]
"""callback(layer_idx, hidden (B, T, D)): an attention module's input."""


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Every attention module with an output projection, by layer index."""
    return {
        int(m.layer_idx): m  # type: ignore[arg-type]
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "o_proj")
    }


def attach(model: torch.nn.Module, backend: Backend) -> str:
    """Make `model` attend through the `kvzip` function with `backend`; returns the name of
    the attention implementation (registered once, idempotent)."""
    for module in attention_modules(model).values():
        setattr(module, BACKEND_ATTRIBUTE, backend)
    return register()


def attached_backend(model: torch.nn.Module) -> Backend:
    """The backend `attach` gave `model` (REFERENCE when none)."""
    modules = attention_modules(model)
    return _backend(next(iter(modules.values()))) if modules else REFERENCE


def _backend(module: torch.nn.Module) -> Backend:
    backend = getattr(module, BACKEND_ATTRIBUTE, REFERENCE)
    assert isinstance(backend, Backend)
    return backend


@contextmanager
def attention_inputs(model: torch.nn.Module, callback: OnInput) -> Iterator[None]:
    """Call `callback(layer, hidden)` before every attention module runs, while active.

    The input of layer l's attention module is the hidden state after the layer's input
    layernorm. Nothing is copied unless the callback keeps it; the hooks are removed when
    the block ends, also on an exception.
    """

    def hook(idx: int):  # type: ignore[no-untyped-def]
        def before(module, args, kwargs):  # type: ignore[no-untyped-def]
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            callback(idx, hidden)

        return before

    modules = attention_modules(model)
    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _tail_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: KVzipCache | None,
    scale: float,
    backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hq, T, d) over the tail -> out (B, Hq, T, d), lse (B, Hq, T)."""
    if isinstance(cache, StaticKVzipCache):
        return static_tail_attention(query, key, value, cache.length, scale)
    parts = [backend.causal_attention(query[b], key[b], value[b], scale) for b in range(len(query))]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def _context_attention(
    query: torch.Tensor, context: RaggedLayer, scale: float, backend: Backend
) -> tuple[torch.Tensor, torch.Tensor]:
    """All B rows share one context: fold the batch into the query axis (no mask needed,
    every context key precedes every query). -> out (B, Hq, T, d), lse (B, Hq, T)."""
    b, hq, t, d = query.shape
    folded = query.permute(1, 0, 2, 3).reshape(hq, b * t, d)
    out, lse = backend.ragged_attention(
        folded, context.keys, context.values, context.cu_lens, scale, context.max_len
    )
    return out.view(hq, b, t, d).permute(1, 0, 2, 3), lse.view(hq, b, t).permute(1, 0, 2)


def _rows_context_attention(
    query: torch.Tensor, cache: RowsCache, layer_idx: int, scale: float, backend: Backend
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b attends to its own context; rows that share one go in one call.
    query (B, Hq, T, d) -> out (B, Hq, T, d), lse (B, Hq, T) fp32."""
    groups = cache.groups()
    if len(groups) == 1:
        return _context_attention(query, groups[0][0].layers[layer_idx], scale, backend)
    out = torch.empty_like(query)
    lse = torch.empty(query.shape[:3], dtype=torch.float32, device=query.device)
    for context, index in groups:
        out_g, lse_g = _context_attention(query[index], context.layers[layer_idx], scale, backend)
        out[index], lse[index] = out_g.to(out.dtype), lse_g.float()
    return out, lse


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
    backend = _backend(module)
    context = None
    if kvzip_cache is not None and kvzip_cache.context is not None:
        context = kvzip_cache.context.layers[layer_idx]
    if isinstance(kvzip_cache, StaticKVzipCache) and context is not None:
        fused = backend.fused_static_decode(
            query,
            context.keys,
            context.values,
            context.cu_lens,
            key,
            value,
            kvzip_cache.length,
            scale,
        )
        if fused is not None:
            return fused.transpose(1, 2).contiguous(), None
    if isinstance(kvzip_cache, RowsCache) and kvzip_cache.table is not None:
        fused = backend.rows_decode(query, kvzip_cache, layer_idx, scale)
        if fused is not None:
            return fused.transpose(1, 2).contiguous(), None
    out, lse = _tail_attention(query, key, value, kvzip_cache, scale, backend)
    if isinstance(kvzip_cache, RowsCache):  # continuous batch: each row its own context
        out_r, lse_r = _rows_context_attention(query, kvzip_cache, layer_idx, scale, backend)
        return backend.merge_partials(out_r, lse_r, out, lse).transpose(1, 2).contiguous(), None
    lse_c = None
    if context is not None:
        out_c, lse_c = _context_attention(query, context, scale, backend)
        out = backend.merge_partials(out_c, lse_c, out, lse)
    if kvzip_cache is not None and kvzip_cache.scorer is not None:
        kvzip_cache.scorer.observe(  # type: ignore[attr-defined]
            layer_idx,
            query[0],
            context,
            key[0],
            scale,
            None if lse_c is None else lse_c[0],
            lse[0],
        )
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the function under ATTENTION_NAME (idempotent) and return the name."""
    AttentionInterface.register(ATTENTION_NAME, kvzip_attention)
    return ATTENTION_NAME
