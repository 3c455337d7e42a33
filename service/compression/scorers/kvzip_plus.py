"""`kvzip_plus`: KVzip scores with the KVzip+ normalisation (KVZIP.md, "KVzip+").

Each local attention probability p[j, t, i] (query head j, reconstruction query t, chunk
key i) is multiplied by ||W_O^(j) v_i|| / ||x_t|| before the max over the group and the
queries: ||W_O^(j) v_i|| is what pair i writes into the residual stream through head j,
x_t is the attention input (post input-norm hidden state) of query t. In log space:

    score[h, i] = exp(max_g (max_t (logit - lse - log||x_t||) + log||W_O^(j) v_i||))

so, as for plain KVzip, no probability matrix is materialised.
"""

from __future__ import annotations

import torch

from service.compression.reconstruction import QUERY_BLOCK, ChunkScorer, _local_lse, use_triton
from service.compression.runner import ModelRunner
from service.compression.scorers.base import Progress
from service.compression.scorers.kvzip import KVzipScorer
from service.engine.attention_hook import attention_inputs, attention_modules
from service.engine.backends import REFERENCE, Backend
from service.engine.kvcache import CompressedContext, RaggedLayer

VALUE_BLOCK = 512


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
    backend: Backend = REFERENCE,
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
    if use_triton(q, backend):  # the KVzip kernel, max per query head: (Hq, m) -> (H, G, m)
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
        backend: Backend = REFERENCE,
    ) -> None:
        super().__init__(prefix_len, start, end, len(modules), backend)
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
            lse = _local_lse(q, prefix, chunk, tail_k, scale, self.backend)
        o_weight = self.modules[layer_idx].o_proj.weight  # type: ignore[union-attr]
        value_norms = value_output_norms(o_weight, values[:, self.start : self.end])  # type: ignore[arg-type]
        norms = self.hidden_norms[layer_idx]
        self.scores[layer_idx] = plus_scores(q, chunk, lse, scale, norms, value_norms, self.backend)


class KVzipPlusScorer(KVzipScorer):
    """KVzip reconstruction scores with the KVzip+ normalisation: (H, n) per layer."""

    name = "kvzip_plus"

    def __init__(self) -> None:
        self._modules: dict[int, torch.nn.Module] = {}
        self._norms: dict[int, torch.Tensor] = {}

    def chunk_scorer(
        self, runner: ModelRunner, prefix_len: int, start: int, end: int
    ) -> ChunkScorer:
        return PlusChunkScorer(prefix_len, start, end, self._modules, self._norms, runner.backend)

    def score(
        self, runner: ModelRunner, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        self._modules, self._norms = attention_modules(runner.model), {}

        def record(layer: int, hidden: torch.Tensor) -> None:  # ||x_t|| (T,)
            self._norms[layer] = hidden[0].float().norm(dim=-1)

        with attention_inputs(runner.model, record):
            return super().score(runner, full, progress)
