"""KVzip pair-level scoring by context reconstruction (KVZIP.md, "Scoring").

For reconstruction chunk k the model runs x_k over the full context; in every layer the
scorer takes the post-RoPE queries of x_k and computes a LOCAL softmax over
[prefix keys] + [chunk k's keys] + [x_k's own keys, causal]. The score of a chunk pair is
the max of its probability over the G query heads of its group and all x_k queries.
"""

from __future__ import annotations

import torch

from service.kvcache import RaggedLayer

QUERY_BLOCK = 256


def local_scores(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    chunk_k: torch.Tensor,
    tail_k: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Max local-softmax probability of every chunk key.

    q: (Hq, T, d) queries of x_k; prefix_k: (H, s, d); chunk_k: (H, m, d); tail_k: (H, T, d)
    keys of x_k itself. Returns (H, m) fp32. Works in query blocks, so the transient block
    is (H, G, QUERY_BLOCK, s + m + T).
    """
    h, m = chunk_k.shape[0], chunk_k.shape[1]
    s, t = prefix_k.shape[1], tail_k.shape[1]
    hq, _, d = q.shape
    qg = q.float().view(h, hq // h, t, d)
    keys = torch.cat([prefix_k, chunk_k, tail_k], dim=1).float()  # (H, s+m+T, d)
    cols = torch.arange(t, device=q.device)
    best = torch.zeros(h, m, dtype=torch.float32, device=q.device)
    for r0 in range(0, t, QUERY_BLOCK):
        rows = torch.arange(r0, min(r0 + QUERY_BLOCK, t), device=q.device)
        logits = torch.einsum("hgtd,hkd->hgtk", qg[:, :, rows], keys) * scale
        future = (cols.unsqueeze(0) > rows.unsqueeze(1))  # (b, T): tail key after the query
        logits[..., s + m :] = logits[..., s + m :].masked_fill(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        best = torch.maximum(best, probs[..., s : s + m].amax(dim=(1, 2)))
    return best


class ChunkScorer:
    """Collects, layer by layer, the scores of one chunk during the x_k forward.

    prefix_len: s; start/end: the chunk's cache positions [s + a, s + b).
    After the forward, `scores[l]` is (H, b - a) fp32.
    """

    def __init__(self, prefix_len: int, start: int, end: int, n_layers: int) -> None:
        self.prefix_len, self.start, self.end = prefix_len, start, end
        self.scores: list[torch.Tensor | None] = [None] * n_layers

    def observe(
        self,
        layer_idx: int,
        q: torch.Tensor,
        context: RaggedLayer | None,
        tail_k: torch.Tensor,
        scale: float,
    ) -> None:
        """q (Hq, T, d); context: the uncompressed (uniform) layer; tail_k (H, T, d)."""
        if context is None:
            raise ValueError("scoring needs the full context attached to the cache")
        keys, _ = context.dense()
        prefix = keys[:, : self.prefix_len]
        chunk = keys[:, self.start : self.end]
        self.scores[layer_idx] = local_scores(q, prefix, chunk, tail_k, scale)
