"""The base class of every scoring method, and the helpers several of them share.

A scorer turns the all-kept context (every KV head holds the s + n prefill pairs) into one
importance score per context pair: per layer an (H, n) fp32 tensor. Selection
(service.compression.selection) is the same for every method: one global top-k over all
L*H*n scores, the protected prefix always kept. So two methods differ only in their scores.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch

from service.compression.runner import ModelRunner
from service.engine.kvcache import CompressedContext, RaggedLayer

Progress = Callable[[float], None]


class Scorer:
    """One compression method. Subclasses set `name` and override `score`."""

    name: ClassVar[str] = ""

    def score(
        self, runner: ModelRunner, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        """full: the all-kept context. Returns per layer the (H, n) fp32 context scores."""
        raise NotImplementedError

    def check(self, runner: ModelRunner) -> None:
        """InvalidInputError when this method cannot run on `runner` (a calibration or a
        predictor it needs is missing), before any work; nothing to check by default."""

    def capture(self, runner: ModelRunner) -> AbstractContextManager[None]:
        """What runs around the ingest prefill (kvzap scores inside it); nothing by default."""
        return nullcontext()


def truncated(full: CompressedContext, length: int) -> CompressedContext:
    """The first `length` positions of an all-kept context (every head cut the same way)."""
    layers = []
    for layer in full.layers:
        keys, values = layer.dense()
        scores = layer.scores.view(layer.n_heads, -1)
        layers.append(
            RaggedLayer.from_dense(keys[:, :length], values[:, :length], scores[:, :length])
        )
    return CompressedContext(
        tuple(layers),
        full.context_ids[:length],
        min(full.prefix_len, length),
        full.method,
        1.0,
        full.chunk_size,
        full.created_at,
    )


def uniform_scores(full: CompressedContext, values: torch.Tensor) -> list[torch.Tensor]:
    """The same (n,) score vector for every layer and head: per layer (H, n)."""
    return [
        values.to(layer.keys.device, torch.float32).expand(layer.n_heads, -1).clone()
        for layer in full.layers
    ]
