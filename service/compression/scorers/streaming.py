"""`streaming`: StreamingLLM's attention sinks + recent window, as scores.

The sinks are the protected prefix (BOS, system prompt, instruction), which every method
keeps anyway; among the context pairs the most recent win: score = (i + 1) / n for context
position i, the same in every layer and head. So at ratio r every head keeps the last
r * n context tokens (the global selection breaks the tie at the boundary position by
layer order).
"""

from __future__ import annotations

import torch

from service.compression.runner import ModelRunner
from service.compression.scorers.base import Progress, Scorer, uniform_scores
from service.engine.kvcache import CompressedContext


class StreamingScorer(Scorer):
    """Recency: (H, n) per layer, (i + 1) / n everywhere."""

    name = "streaming"

    def score(
        self, runner: ModelRunner, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        n = full.context_len
        return uniform_scores(full, torch.arange(1, n + 1, dtype=torch.float32) / max(n, 1))
