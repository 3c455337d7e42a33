"""`kvzip`: pair-level scores by context reconstruction (KVZIP.md, "Scoring").

For each chunk of m context tokens the reconstruction prompt x_k runs over the full
context; in every layer `service.compression.reconstruction.ChunkScorer` takes the post-RoPE
queries of x_k and keeps, per chunk key, the max local-softmax probability over the GQA
group and all x_k queries.
"""

from __future__ import annotations

import torch

from service.compression.reconstruction import ChunkScorer
from service.compression.runner import ModelRunner
from service.compression.scorers.base import Progress, Scorer
from service.engine.kvcache import CompressedContext
from service.engine.prompt import build_layout


class KVzipScorer(Scorer):
    """Max local attention of the reconstruction queries on each pair: (H, n) per layer."""

    name = "kvzip"

    def chunk_scorer(
        self, runner: ModelRunner, prefix_len: int, start: int, end: int
    ) -> ChunkScorer:
        """The observer of one reconstruction forward (KVzip+ swaps in its own)."""
        return ChunkScorer(prefix_len, start, end, runner.n_layers, runner.backend)

    def score(
        self, runner: ModelRunner, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        s, n, m = full.prefix_len, full.context_len, full.chunk_size
        ids = full.context_ids.tolist()
        per_layer = [
            torch.zeros(layer.n_heads, n, device=layer.keys.device) for layer in full.layers
        ]
        layout = build_layout(runner.tokenizer)
        for a in range(0, n, m):
            b = min(a + m, n)
            previous = ids[s + a - m : s + a] if a > 0 else None
            x = layout.reconstruction_ids(ids[s + a : s + b], previous)
            scorer = self.chunk_scorer(runner, s, s + a, s + b)
            runner.forward(full, x, scorer, piece=len(x))
            runner.reconstruction_passes += 1
            for layer_scores, chunk_scores in zip(per_layer, scorer.scores, strict=True):
                assert chunk_scores is not None
                layer_scores[:, a:b] = chunk_scores
            if progress:
                progress(b / n)
        return per_layer
