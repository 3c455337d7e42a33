"""SQuAD exact match / F1 (the official normalisation), needle hits, and KL / argmax flips."""

from __future__ import annotations

import re
import string
from collections import Counter

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD v1.1 evaluation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def best(metric, prediction: str, golds: tuple[str, ...]) -> float:  # type: ignore[no-untyped-def]
    return max(metric(prediction, g) for g in golds)


def needle_hit(prediction: str, key: str) -> float:
    return float(key in prediction)


def divergence(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Summed KL(reference || other) and argmax flips over positions: logits (T, V) each."""
    p = torch.log_softmax(reference.double(), dim=-1)
    q = torch.log_softmax(other.double(), dim=-1)
    kl = (p.exp() * (p - q)).sum(dim=-1).clamp_min(0.0)
    flips = (reference.argmax(dim=-1) != other.argmax(dim=-1)).double()
    return float(kl.sum()), float(flips.sum())
