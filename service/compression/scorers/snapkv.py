"""`snapkv`: SnapKV's observation window, run query-agnostically (Li et al., 2024).

The window is the last WINDOW context tokens (not a question: the question is never seen
while compressing). score[l, h, i] = the mean over the window queries and the G query
heads of KV head h of their attention probability on key i, max-pooled over POOL
neighbouring keys; the window's own pairs get score 1 (the largest possible mean
probability), so they are kept first, as in SnapKV.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.compression.runner import ModelRunner
from service.compression.scorers.attention_mass import AttentionMass
from service.compression.scorers.base import Progress, Scorer, truncated
from service.engine.kvcache import CompressedContext

WINDOW = 32
POOL = 5


def pooled(mean: torch.Tensor, kernel: int = POOL) -> torch.Tensor:
    """1-D max pooling over keys, same length: (H, k) -> (H, k)."""
    if mean.shape[1] == 0:
        return mean
    return F.max_pool1d(mean.unsqueeze(0), kernel, stride=1, padding=kernel // 2).squeeze(0)


class SnapKVScorer(Scorer):
    """Pooled mean attention of the last WINDOW context queries: (H, n) per layer."""

    name = "snapkv"

    def score(
        self, runner: ModelRunner, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        s, n = full.prefix_len, full.context_len
        w = min(WINDOW, n)
        observer = AttentionMass(s, n, runner.n_layers)
        window = full.context_ids[s + n - w :].tolist()
        runner.forward(truncated(full, s + n - w), window, observer)
        out = []
        for mass in observer.mass:
            assert mass is not None
            group = runner.model.config.num_attention_heads // mass.shape[0]
            scores = torch.ones_like(mass)
            scores[:, : n - w] = pooled(mass[:, : n - w] / (w * group))
            out.append(scores)
        return out
