"""`h2o`: heavy hitters plus a recent window, as published (Zhang et al., NeurIPS 2023).

H2O keeps, in every head, the pairs with the largest ACCUMULATED attention (the heavy
hitters: the sum over every query t >= i of the attention probability on key i) and the
most recent pairs, half of the budget each. Query-agnostic here: the accumulating queries
are the context's own tokens (the question is never seen); the protected prefix (the
attention sinks) is kept as by every method.

As scores (ratio-independent, so a stored context re-selects at any smaller ratio): with
rank_recent(i) = n - 1 - i and rank_heavy(i) the position of i in the head's accumulated
attention, heaviest first,

    score[l, h, i] = 1 - min(rank_recent(i), rank_heavy(i)) / n

so at any budget a head keeps the union of its j most recent and its j heaviest pairs, j
the same in every head (the global top-k fills the score levels one by one): H2O's even
split. The accumulated attention comes from running the context once more over the
prefix, so the prefill stays shared with the other methods; a production H2O would
accumulate during the prefill itself.
"""

from __future__ import annotations

import torch

from service.compression.runner import ModelRunner
from service.compression.scorers.attention_mass import AttentionMass
from service.compression.scorers.base import Progress, Scorer, truncated
from service.engine.kvcache import CompressedContext


def heavy_recent_scores(mass: torch.Tensor) -> torch.Tensor:
    """(H, n) accumulated attention -> (H, n) H2O scores (see the module docstring)."""
    h, n = mass.shape
    order = torch.sort(mass, dim=1, descending=True, stable=True).indices
    rank_heavy = torch.empty_like(order)
    rank_heavy.scatter_(1, order, torch.arange(n, device=mass.device).expand(h, n))
    rank_recent = torch.arange(n - 1, -1, -1, device=mass.device).expand(h, n)
    return 1.0 - torch.minimum(rank_heavy, rank_recent).float() / max(n, 1)


class H2OScorer(Scorer):
    """Heavy hitters (accumulated attention of all context queries) + recent: (H, n)."""

    name = "h2o"

    def score(
        self, runner: ModelRunner, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        return [heavy_recent_scores(m) for m in accumulated_attention(runner, full)]


def accumulated_attention(runner: ModelRunner, full: CompressedContext) -> list[torch.Tensor]:
    """Per layer (H, n): the summed attention of every context query (and the G query
    heads of each KV head's group) on each context key."""
    s, n = full.prefix_len, full.context_len
    observer = AttentionMass(s, n, runner.n_layers)
    runner.forward(truncated(full, s), full.context_ids[s:].tolist(), observer)
    return [m for m in observer.mass if m is not None]
