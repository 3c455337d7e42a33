"""`snapkv`: SnapKV's observation window, run query-agnostically (Li et al., 2024).

The window is the last WINDOW context tokens (not a question: the question is never seen
while compressing). Per KV head h, vote[h, i] = the attention probability the window
queries and the G query heads of h put on context key i (summed; the softmax runs over
every key, the protected prefix included), average-pooled over POOL neighbouring keys
(zero padding counted, as `F.avg_pool1d`). As published, every head keeps the same
number of pairs: the whole window, then its top votes (arXiv 2404.14469, §4; the reference
code FasterDecoding/SnapKV `snapkv_utils.py`: window 32, kernel 5, `avgpool`, one `topk`
per head).

As scores (ratio-independent, so a stored context re-selects at any smaller ratio): with
rank(i) = the pair's place in its head's order (the window first, newest first; then the
pooled votes, largest first), score[l, h, i] = 1 - rank(i) / n. The global top-k fills
these levels one by one, so at any budget every head keeps its j best pairs, j the same
in every head (±1): the paper's per-head budget inside the service's one selection.
`per_head=False` gives the pooled votes themselves (the window at 1), which the global
top-k spreads unevenly over heads: the earlier `snapkv`, kept for comparison.
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


def pooled(votes: torch.Tensor, kernel: int = POOL, pooling: str = "avg") -> torch.Tensor:
    """1-D pooling over keys, same length: (H, k) -> (H, k)."""
    if votes.shape[1] == 0:
        return votes
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    return pool(votes.unsqueeze(0), kernel, stride=1, padding=kernel // 2).squeeze(0)


def per_head_ranks(votes: torch.Tensor, window: int) -> torch.Tensor:
    """(H, n - window) pooled votes -> (H, n) scores 1 - rank / n: the window first
    (newest first), then the votes, largest first (ties: the earlier key)."""
    h, m = votes.shape
    n = m + window
    order = torch.sort(votes, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(m, device=votes.device).expand(h, m))
    ranks = torch.cat(
        [rank + window, torch.arange(window - 1, -1, -1, device=votes.device).expand(h, window)],
        dim=1,
    )
    return 1.0 - ranks.float() / max(n, 1)


class SnapKVScorer(Scorer):
    """Observation-window votes, pooled, a per-head budget: (H, n) per layer."""

    name = "snapkv"

    def __init__(self, per_head: bool = True, pooling: str = "avg", kernel: int = POOL) -> None:
        self.per_head, self.pooling, self.kernel = per_head, pooling, kernel

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
            votes = pooled(mass[:, : n - w] / (w * group), self.kernel, self.pooling)
            if self.per_head:
                out.append(per_head_ranks(votes, w))
            else:
                scores = torch.ones_like(mass)
                scores[:, : n - w] = votes
                out.append(scores)
        return out
