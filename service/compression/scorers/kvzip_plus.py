"""`kvzip_plus`: KVzip scores with the KVzip+ normalisation (KVZIP.md, "KVzip+").

Each local attention probability p[j, t, i] (query head j, reconstruction query t, chunk
key i) is multiplied by ||W_O^(j) v_i|| / ||x_t|| before the max over the group and the
queries: ||W_O^(j) v_i|| is what pair i writes into the residual stream through head j,
x_t is the attention input (post input-norm hidden state) of query t. In log space:

    score[h, i] = exp(max_g (max_t (logit - lse - log||x_t||) + log||W_O^(j) v_i||))

so, as for plain KVzip, no probability matrix is materialised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from service.compression.reconstruction import QUERY_BLOCK, ChunkScorer, _local_lse, use_triton
from service.compression.scorers.base import Progress
from service.compression.scorers.kvzip import KVzipScorer
from service.engine.kvcache import CompressedContext, RaggedLayer

if TYPE_CHECKING:
    from service.engine.kvzip_engine import KVzipEngine

VALUE_BLOCK = 512


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Every attention module with an output projection, by layer index."""
    return {
        int(m.layer_idx): m  # type: ignore[arg-type]
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "o_proj")
    }


def value_output_norms(o_weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """||W_O^(j) v_i||: o_weight (D, Hq*d), values (H, m, d) -> (H, G, m) fp32."""
    h, m, d = values.shape
    w = o_weight.float().view(o_weight.shape[0], h, -1, d)  # (D, H, G, d)
    out = torch.empty(h, w.shape[2], m, dtype=torch.float32, device=values.device)
    for i0 in range(0, m, VALUE_BLOCK):
        i1 = min(i0 + VALUE_BLOCK, m)
        out[:, :, i0:i1] = torch.einsum("ohgd,hmd->hgmo", w, values[:, i0:i1].float()).norm(dim=-1)
    return out


def plus_scores(
    q: torch.Tensor,
    chunk_k: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    hidden_norms: torch.Tensor,
    value_norms: torch.Tensor,
) -> torch.Tensor:
    """KVzip+ score of every chunk key.

    q (Hq, T, d); chunk_k (H, m, d); lse (Hq, T) local log-normaliser; hidden_norms (T,)
    ||x_t||; value_norms (H, G, m) ||W_O^(j) v_i||. Returns (H, m) fp32. A query whose
    attention input is exactly zero (a zero embedding row) is ignored.
    """
    h, m = chunk_k.shape[0], chunk_k.shape[1]
    hq, t, d = q.shape
    log_norms = hidden_norms.float().log()
    log_norms = log_norms.masked_fill(hidden_norms == 0, float("inf"))  # x_t = 0: no signal
    row_shift = lse.view(h, hq // h, t) + log_norms.view(1, 1, t)
    if use_triton(q):  # the KVzip kernel, max per query head: (Hq, m) -> (H, G, m)
        from service.engine.backends import triton_scores

        best = triton_scores.max_logits(
            q, chunk_k, row_shift.view(hq, t), scale, per_query_head=True
        ).view(h, hq // h, m)
        return torch.exp((best + value_norms.log()).amax(dim=1))
    qg = q.view(h, hq // h, t, d)
    best = torch.full((h, hq // h, m), float("-inf"), dtype=torch.float32, device=q.device)
    for r0 in range(0, t, QUERY_BLOCK):
        rows = slice(r0, min(r0 + QUERY_BLOCK, t))
        logits = torch.einsum("hgtd,hkd->hgtk", qg[:, :, rows], chunk_k).float() * scale
        logits -= row_shift[:, :, rows].unsqueeze(-1)
        best = torch.maximum(best, logits.amax(dim=2))
    return torch.exp((best + value_norms.log()).amax(dim=1))


class PlusChunkScorer(ChunkScorer):
    """ChunkScorer with the KVzip+ weights; `hidden_norms[l]` (T,) is filled by a pre-hook
    on layer l's attention module just before its attention runs."""

    def __init__(
        self,
        prefix_len: int,
        start: int,
        end: int,
        modules: dict[int, torch.nn.Module],
        hidden_norms: dict[int, torch.Tensor],
    ) -> None:
        super().__init__(prefix_len, start, end, len(modules))
        self.modules, self.hidden_norms = modules, hidden_norms

    def observe(
        self,
        layer_idx: int,
        q: torch.Tensor,
        context: RaggedLayer | None,
        tail_k: torch.Tensor,
        scale: float,
        lse_context: torch.Tensor | None = None,
        lse_tail: torch.Tensor | None = None,
    ) -> None:
        if context is None:
            raise ValueError("scoring needs the full context attached to the cache")
        keys, values = context.dense()
        prefix = keys[:, : self.prefix_len]
        chunk = keys[:, self.start : self.end]
        lse = self.local_lse(q, keys, scale, lse_context, lse_tail)
        if lse is None:
            lse = _local_lse(q, prefix, chunk, tail_k, scale)
        o_weight = self.modules[layer_idx].o_proj.weight  # type: ignore[union-attr]
        value_norms = value_output_norms(o_weight, values[:, self.start : self.end])  # type: ignore[arg-type]
        norms = self.hidden_norms[layer_idx]
        self.scores[layer_idx] = plus_scores(q, chunk, lse, scale, norms, value_norms)


@contextmanager
def hidden_norm_hooks(
    modules: dict[int, torch.nn.Module], sink: dict[int, torch.Tensor]
) -> Iterator[None]:
    """Record ||x_t|| (T,) of every attention module's input into sink[layer] while active."""

    def hook(idx: int):  # type: ignore[no-untyped-def]
        def record(module, args, kwargs):  # type: ignore[no-untyped-def]
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            sink[idx] = hidden[0].float().norm(dim=-1)

        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class KVzipPlusScorer(KVzipScorer):
    """KVzip reconstruction scores with the KVzip+ normalisation: (H, n) per layer."""

    name = "kvzip_plus"

    def __init__(self) -> None:
        self._modules: dict[int, torch.nn.Module] = {}
        self._norms: dict[int, torch.Tensor] = {}

    def chunk_scorer(self, engine: KVzipEngine, prefix_len: int, start: int, end: int) -> object:
        return PlusChunkScorer(prefix_len, start, end, self._modules, self._norms)

    def score(
        self, engine: KVzipEngine, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        self._modules, self._norms = attention_modules(engine.model), {}
        with hidden_norm_hooks(self._modules, self._norms):
            return super().score(engine, full, progress)
