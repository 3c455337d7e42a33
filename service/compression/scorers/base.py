"""The base class of every scoring method, and the helpers several of them share.

A scorer turns the all-kept context (every KV head holds the s + n prefill pairs) into one
importance score per context pair: per layer an (H, n) fp32 tensor. Selection
(service.compression.selection) is the same for every method: one global top-k over all
L*H*n scores, the protected prefix always kept. So two methods differ only in their scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from service.engine.generation import prefill
from service.engine.kvcache import CompressedContext, KVzipCache, RaggedLayer

if TYPE_CHECKING:
    from service.engine.kvzip_engine import KVzipEngine

Progress = Callable[[float], None]


class Observer(Protocol):
    """What the `kvzip` attention function reports to, layer by layer, during a forward."""

    def observe(
        self,
        layer_idx: int,
        q: torch.Tensor,
        context: RaggedLayer | None,
        tail_k: torch.Tensor,
        scale: float,
        lse_context: torch.Tensor | None = None,
        lse_tail: torch.Tensor | None = None,
    ) -> None: ...


class Scorer:
    """One compression method. Subclasses set `name` and override `score`."""

    name: ClassVar[str] = ""
    #: whether ingest runs a model pass over the context beyond the prefill
    needs_model_pass: ClassVar[bool] = True

    def score(
        self, engine: KVzipEngine, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        """full: the all-kept context. Returns per layer the (H, n) fp32 context scores."""
        raise NotImplementedError

    def capture(self, engine: KVzipEngine) -> AbstractContextManager[None]:
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


def forward_observed(
    engine: KVzipEngine, context: CompressedContext, ids: Sequence[int], observer: Observer
) -> None:
    """Run `ids` after `context` (positions continue at context.seq_len), reporting to
    `observer` in every layer. The context is not modified."""
    cache = KVzipCache(context, engine.n_layers)
    cache.scorer = observer
    prefill(engine.model, ids, cache, engine.config.prefill_chunk_tokens)


def uniform_scores(full: CompressedContext, values: torch.Tensor) -> list[torch.Tensor]:
    """The same (n,) score vector for every layer and head: per layer (H, n)."""
    return [
        values.to(layer.keys.device, torch.float32).expand(layer.n_heads, -1).clone()
        for layer in full.layers
    ]
