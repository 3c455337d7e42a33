"""`kvzap`: KVzip+ scores predicted from the hidden states, inside the prefill.

A per-layer predictor (service.compression.learned: linear, or a 2-layer GELU MLP; fitted by
`kvzip calibrate-scorer` or NVIDIA's released weights) maps the attention input x_t (after
the input layernorm) of every token to its predicted log KVzip+ score in each KV head.
During ingest, forward pre-hooks on the attention modules apply it while the prefill runs,
so there is no reconstruction pass: the extra cost is one small matmul (or two) per layer.

score[l, h, i] = exp(clamp(predicted log-score)), so selection is the same global top-k
as every method's. With `compression.threshold` t instead, ingest keeps every pair whose
predicted log-score is >= t, plus the last WINDOW context tokens in every head (KVzap's
protected recent window), and the context's ratio is the fraction it achieved.

Outside an ingest (`engine.score(full, "kvzap")`: re-scoring a stored context, the quality
bench) the attention inputs are recomputed by running the context once over its prefix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from service.compression.learned.capture import attention_inputs
from service.compression.learned.predictor import (
    KVzapPredictor,
    check_fits,
    load_predictor,
    stored_predictor_path,
)
from service.compression.scorers.base import Progress, Scorer, truncated
from service.engine.generation import prefill
from service.engine.kvcache import CompressedContext, KVzipCache, RaggedLayer

if TYPE_CHECKING:
    from service.engine.kvzip_engine import KVzipEngine

WINDOW = 128
"""Threshold mode: the most recent context tokens every head keeps."""
LOG_RANGE = (-80.0, 60.0)
"""Predicted log-scores are clamped here, so exp() stays finite and positive in fp32."""
WINDOW_SCORE = 1e30
"""Stored score of the recent window in threshold mode: above any clamped prediction."""
THRESHOLD_MAX = 65.0
"""A threshold above every prediction still keeps the window: exp(65) < WINDOW_SCORE."""

_LOADED: dict[tuple[str, int, str, str], KVzapPredictor] = {}


def predictor_dir(engine: KVzipEngine) -> Path:
    """Where `kvzip calibrate-scorer` stores predictors: <data_dir>/kvzap/."""
    return engine.kvzap_dir or engine.head_scores_dir.parent / "kvzap"


def engine_predictor(engine: KVzipEngine) -> KVzapPredictor:
    """The engine's stored predictor on the model's device and dtype (loaded once per file).

    InvalidInputError when the model has none or it does not fit the model's shapes.
    """
    directory = predictor_dir(engine)
    path = stored_predictor_path(directory, engine.identity, engine.kvzap_kind)
    device, dtype = engine.model.device, engine.model.dtype
    key = (str(path), path.stat().st_mtime_ns, str(device), str(dtype))
    if key not in _LOADED:  # read the file only when it is new or changed
        stored = load_predictor(directory, engine.identity, engine.kvzap_kind)
        config = engine.model.config
        check_fits(stored, engine.n_layers, config.hidden_size, config.num_key_value_heads)
        if len(_LOADED) >= 4:  # a few files at most (a bench alternates linear and mlp)
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = stored.to(device, dtype)
    return _LOADED[key]


class KVzapScorer(Scorer):
    """Predicted KVzip+ scores: (H, n) per layer, computed while the prefill runs."""

    name = "kvzap"
    needs_model_pass = False

    def __init__(self, predictor: KVzapPredictor | None = None) -> None:
        self.predictor = predictor  # None: the engine's stored one
        self._captured: dict[int, list[torch.Tensor]] | None = None

    def _ready(self, engine: KVzipEngine) -> KVzapPredictor:
        if self.predictor is None:
            return engine_predictor(engine)
        return self.predictor.to(engine.model.device, engine.model.dtype)

    @contextmanager
    def capture(self, engine: KVzipEngine) -> Iterator[None]:
        """While active, every attention module's input is scored as it goes by."""
        predictor = self._ready(engine)
        sink: dict[int, list[torch.Tensor]] = {}

        def predict(layer: int, hidden: torch.Tensor) -> None:
            sink.setdefault(layer, []).append(predictor.predict(layer, hidden[0]))

        with attention_inputs(engine.model, predict):
            yield
        self._captured = sink

    def score(
        self, engine: KVzipEngine, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        captured, self._captured = self._captured, None
        if captured is None:  # not inside an ingest: run the context once over its prefix
            with self.capture(engine):
                s = full.prefix_len
                cache = KVzipCache(truncated(full, s), engine.n_layers)
                ids = full.context_ids[s:].tolist()
                prefill(engine.model, ids, cache, engine.config.prefill_chunk_tokens)
            captured, self._captured = self._captured, None
        assert captured is not None
        n = full.context_len
        low, high = LOG_RANGE
        return [
            torch.cat(captured[i])[-n:].T.float().clamp(low, high).exp()
            for i in range(len(full.layers))
        ]


def threshold_select(
    full: CompressedContext, threshold: float, window: int = WINDOW
) -> CompressedContext:
    """Keep pairs scored >= exp(threshold) and the last `window` context tokens.

    full: an all-kept scored context (every head holds s + n pairs). The recent window is
    stored with WINDOW_SCORE, so a later query-time re-selection keeps it first too.
    The result's ratio is the achieved kept fraction of the context pairs.
    """
    s, n = full.prefix_len, full.context_len
    cut = math.exp(min(threshold, THRESHOLD_MAX))  # compared in float64
    layers, kept = [], 0
    for layer in full.layers:
        h = layer.n_heads
        scores = layer.scores.view(h, -1).clone()
        scores[:, max(s, s + n - window) :] = WINDOW_SCORE
        keep = scores.double() >= cut
        uniform = RaggedLayer(
            layer.keys, layer.values, layer.cu_lens, scores.reshape(-1), layer.positions
        )
        layers.append(uniform.keep(keep.reshape(-1)))
        kept += int(keep[:, s:].sum())
    ratio = kept / full.total_pairs if full.total_pairs else 1.0
    return full.with_layers(tuple(layers), ratio=ratio)
