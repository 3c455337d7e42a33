"""`h2o`: heavy hitters, i.e. the attention each pair accumulates (Zhang et al., 2023).

Query-agnostic: the accumulating queries are the context's own tokens (the question is
never seen). score[l, h, i] = sum over every context query t >= i and the G query heads of
KV head h of the model's attention probability on key i. The context runs once more over
the prefix to get the queries, so the prefill stays shared with the other methods; a
production H2O would accumulate during the prefill itself.
"""

from __future__ import annotations

import torch

from service.compression.runner import ModelRunner
from service.compression.scorers.attention_mass import AttentionMass
from service.compression.scorers.base import Progress, Scorer, truncated
from service.engine.kvcache import CompressedContext


class H2OScorer(Scorer):
    """Accumulated attention of all context queries: (H, n) per layer."""

    name = "h2o"

    def score(
        self, runner: ModelRunner, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        s, n = full.prefix_len, full.context_len
        observer = AttentionMass(s, n, runner.n_layers)
        ids = full.context_ids[s:].tolist()
        runner.forward(truncated(full, s), ids, observer)
        return [m for m in observer.mass if m is not None]
