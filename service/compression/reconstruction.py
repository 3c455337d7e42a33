"""KVzip pair-level scoring by context reconstruction (KVZIP.md, "Scoring").

For reconstruction chunk k the model runs x_k over the full context; in every layer the
scorer takes the post-RoPE queries of x_k and computes a LOCAL softmax over
[prefix keys] + [chunk k's keys] + [x_k's own keys, causal]. The score of a chunk pair is
the max of its probability over the G query heads of its group and all x_k queries.
"""

from __future__ import annotations

import torch

from service.engine.backends import REFERENCE, Backend
from service.engine.kvcache import RaggedLayer

QUERY_BLOCK = 256


def local_scores(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    chunk_k: torch.Tensor,
    tail_k: torch.Tensor,
    scale: float,
    lse: torch.Tensor | None = None,
    backend: Backend = REFERENCE,
) -> torch.Tensor:
    """Max local-softmax probability of every chunk key.

    q: (Hq, T, d) queries of x_k; prefix_k: (H, s, d); chunk_k: (H, m, d); tail_k: (H, T, d)
    keys of x_k itself; lse (Hq, T), when the caller already has the local log-normaliser.
    Returns (H, m) fp32.

    The local log-normaliser lse (Hq, T) comes from fused attention calls (see
    `_local_lse`); since exp is monotonic,
    max_{g,t} p = exp(max_{g,t} (q.k * scale - lse)), so only the (G, T, m) chunk logits
    are formed, in query blocks of QUERY_BLOCK rows; no softmax matrix is materialised.
    On a GPU `backend` one Triton kernel (`service.engine.backends.triton_scores`) does the same
    without forming the logits at all; this torch code is the reference/CPU path.
    """
    if lse is None:
        lse = _local_lse(q, prefix_k, chunk_k, tail_k, scale, backend)
    if use_triton(q, backend):
        from service.engine.backends import triton_scores

        return triton_scores.chunk_scores(q, chunk_k, lse, scale)
    return _torch_local_scores(q, chunk_k, lse, scale)


def _torch_local_scores(
    q: torch.Tensor, chunk_k: torch.Tensor, lse: torch.Tensor, scale: float
) -> torch.Tensor:
    """The reference path of `local_scores` (CPU and non-CUDA backends)."""
    h, m = chunk_k.shape[0], chunk_k.shape[1]
    hq, t, d = q.shape
    qg = q.view(h, hq // h, t, d)
    lse = lse.view(h, hq // h, t)
    best = torch.full((h, m), float("-inf"), dtype=torch.float32, device=q.device)
    for r0 in range(0, t, QUERY_BLOCK):
        rows = slice(r0, min(r0 + QUERY_BLOCK, t))
        logits = torch.einsum("hgtd,hkd->hgtk", qg[:, :, rows], chunk_k).float() * scale
        logits -= lse[:, :, rows].unsqueeze(-1)
        best = torch.maximum(best, logits.amax(dim=(1, 2)))
    return torch.exp(best)


def use_triton(q: torch.Tensor, backend: Backend) -> bool:
    """The Triton scoring kernels run on a GPU backend when q is on CUDA."""
    return q.is_cuda and backend.gpu_kernels


def _local_lse(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    chunk_k: torch.Tensor,
    tail_k: torch.Tensor,
    scale: float,
    backend: Backend = REFERENCE,
) -> torch.Tensor:
    """log-sum-exp over [prefix_k + chunk_k (H, *, d), all visible] + [tail_k (H, T, d),
    causal]: (Hq, T) fp32, the context part and the tail part merged in log space."""
    _, lse_tail = backend.causal_attention(q, tail_k, tail_k, scale)
    return torch.logaddexp(_two_part_lse(q, prefix_k, chunk_k, scale, backend), lse_tail)


def _two_part_lse(
    q: torch.Tensor, first: torch.Tensor, second: torch.Tensor, scale: float, backend: Backend
) -> torch.Tensor:
    """lse (Hq, T) of q over the keys first (H, a, d) and second (H, b, d), all visible.

    GPU backend: one Triton pass over both (strided views, nothing concatenated);
    otherwise one fused attention call over their concatenation.
    """
    if use_triton(q, backend):
        from service.engine.backends import triton_scores

        return triton_scores.range_lse(q, first, second, scale)
    part = torch.cat([first, second], dim=1)
    h, c, d = part.shape
    flat = part.reshape(h * c, d)
    cu = torch.arange(h + 1, dtype=torch.int32, device=q.device) * c
    return backend.ragged_attention(q, flat, flat, cu, scale, c)[1]


def _prefix_chunk_lse(
    q: torch.Tensor,
    keys: torch.Tensor,
    prefix_len: int,
    start: int,
    end: int,
    scale: float,
    backend: Backend,
) -> torch.Tensor:
    """lse (Hq, T) of q over [keys[:, :prefix_len], keys[:, start:end]] (all visible)."""
    return _two_part_lse(q, keys[:, :prefix_len], keys[:, start:end], scale, backend)


class ChunkScorer:
    """Collects, layer by layer, the scores of one chunk during the x_k forward.

    prefix_len: s; start/end: the chunk's cache positions [s + a, s + b); backend: the one
    the model runs with (its own attention calls use it too).
    After the forward, `scores[l]` is (H, b - a) fp32.
    """

    def __init__(
        self, prefix_len: int, start: int, end: int, n_layers: int, backend: Backend = REFERENCE
    ) -> None:
        self.prefix_len, self.start, self.end = prefix_len, start, end
        self.backend = backend
        self.scores: list[torch.Tensor | None] = [None] * n_layers

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
        """q (Hq, T, d); context: the uncompressed (uniform) layer; tail_k (H, T, d).

        lse_context / lse_tail (Hq, T): the model's own attention normalisers over the whole
        context and over x_k, reused so the local softmax costs no extra kernel call for
        the tail (and none at all when the chunk is the whole context).
        """
        if context is None:
            raise ValueError("scoring needs the full context attached to the cache")
        keys, _ = context.dense()
        lse = self.local_lse(q, keys, scale, lse_context, lse_tail)
        prefix = keys[:, : self.prefix_len]
        chunk = keys[:, self.start : self.end]
        self.scores[layer_idx] = local_scores(q, prefix, chunk, tail_k, scale, lse, self.backend)

    def local_lse(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        scale: float,
        lse_context: torch.Tensor | None,
        lse_tail: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The local log-normaliser (Hq, T) from the model's own normalisers, when given.

        keys: the dense context keys (H, s + n, d). None when `lse_tail` is missing (the
        caller then computes it from scratch).
        """
        if lse_tail is None:
            return None
        whole = self.start == self.prefix_len and self.end == keys.shape[1]
        ctx_lse = (
            lse_context
            if whole and lse_context is not None
            else _prefix_chunk_lse(
                q, keys, self.prefix_len, self.start, self.end, scale, self.backend
            )
        )
        return torch.logaddexp(ctx_lse, lse_tail)
