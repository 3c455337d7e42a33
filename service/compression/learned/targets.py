"""What the KVzap predictor is fitted to, and how its ranking is measured.

Selection keeps a global top-k of all L*H*n pair scores, so what a predictor must get
right is the ORDER of the pairs of one document, across layers and heads, not the level
of their log-scores (which moves with the document's length: a longer softmax spreads
thinner). Two target transforms of a text's log-scores y (n, L, H):

    log   y itself (the KVzap recipe: MSE on log KVzip+ scores)
    rank  the normal score of each pair's rank among the text's L*H*n pairs:
          z = Phi^-1((rank + 1/2) / N), the same scale for every text whatever its length;
          a fixed threshold z >= Phi^-1(1 - r) keeps about the top fraction r

and the ranking metrics of a held-out text (sampled pairs, every layer and head pooled):
Spearman's rank correlation, and the recall of the true top fraction by the predicted top.
"""

from __future__ import annotations

import math

import torch

TRANSFORMS = ("rank", "log")


def rank_normal(y: torch.Tensor) -> torch.Tensor:
    """Normal scores of the ranks of every element of y (any shape), ties by position."""
    flat = y.reshape(-1).double()
    ranks = torch.empty_like(flat)
    ranks[torch.sort(flat, stable=True).indices] = torch.arange(flat.numel(), dtype=flat.dtype)
    u = (ranks + 0.5) / flat.numel()
    return (math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)).view(y.shape).float()


def transform(y: torch.Tensor, kind: str) -> torch.Tensor:
    """One text's log-scores (n, L, H) -> its targets by `kind` (see TRANSFORMS)."""
    if kind == "log":
        return y
    if kind == "rank":
        return rank_normal(y)
    raise ValueError(f"target transform must be one of {TRANSFORMS}, not {kind!r}")


def _ranks(v: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(v, dtype=torch.float64)
    out[torch.argsort(v, stable=True)] = torch.arange(v.numel(), dtype=torch.float64)
    return out


def spearman(truth: torch.Tensor, pred: torch.Tensor) -> float:
    """Spearman's rank correlation of two equal-shape tensors (all elements pooled)."""
    a, b = _ranks(truth.reshape(-1)), _ranks(pred.reshape(-1))
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


def top_recall(truth: torch.Tensor, pred: torch.Tensor, fraction: float = 0.3) -> float:
    """Share of the true top `fraction` of the elements that the predicted top holds."""
    k = max(1, int(fraction * truth.numel()))
    top_true = torch.topk(truth.reshape(-1).double(), k).indices
    top_pred = torch.zeros(truth.numel(), dtype=torch.bool)
    top_pred[torch.topk(pred.reshape(-1).double(), k).indices.cpu()] = True
    return float(top_pred[top_true.cpu()].float().mean())
