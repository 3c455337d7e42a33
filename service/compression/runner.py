"""What a scorer may use of the engine: the `ModelRunner` protocol.

Scorers (service.compression.scorers), KVzip reconstruction and the KVzap calibration run
the model through this narrow interface, never through the engine class, so compression
depends on the engine's building blocks only (service.engine.kvzip_engine.KVzipEngine is
the implementation; tests may pass anything with these members).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.config import CompressionConfig, EngineConfig
from service.engine.backends import Backend
from service.engine.fingerprints import ModelIdentity
from service.engine.kvcache import CompressedContext, Document, RaggedLayer


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


class ModelRunner(Protocol):
    """A loaded model and the few operations scorers run on it.

    config: paths (`head_scores_dir`, `kvzap_dir`, `kvzap_kind`) and `prefill_chunk_tokens`;
    backend: the attention backend the model runs with (reconstruction scoring uses it for
    its own attention calls); reconstruction_passes: counts KVzip reconstruction forwards.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: EngineConfig
    identity: ModelIdentity
    n_layers: int
    reconstruction_passes: int

    @property
    def backend(self) -> Backend: ...

    def encode_document(self, text: str, system: str | None = None) -> Document: ...

    def prefill_context(
        self, doc: Document, compression: CompressionConfig
    ) -> CompressedContext: ...

    def forward(
        self,
        context: CompressedContext | None,
        ids: Sequence[int],
        observer: Observer | None = None,
        piece: int | None = None,
    ) -> None:
        """Run `ids` after `context` (positions continue at its seq_len) in pieces of
        `piece` tokens (default: the config's prefill chunk), reporting every layer's
        queries to `observer`. The context is not modified."""
        ...
