"""`kvzap`: KVzip scores predicted from the hidden states, inside the prefill.

A per-layer predictor (service.compression.learned: linear, or a 2-layer GELU MLP; fitted by
`kvzip calibrate-scorer` or NVIDIA's released weights) maps the attention input x_t (after
the input layernorm) of every token to a predicted score in each KV head: what the
predictor's metadata names (`target`): by default the normal score of the pair's rank among
a document's KVzip scores; NVIDIA's released weights predict log KVzip+ scores.
During ingest, forward pre-hooks on the attention modules apply it while the prefill runs,
so there is no reconstruction pass: the extra cost is one small matmul (or two) per layer.

score[l, h, i] = exp(clamp(prediction)), so selection is the same global top-k as every
method's. With `compression.threshold` t instead, ingest keeps every pair whose prediction
is >= t (rank targets: a normal score, 0 keeping about half the pairs; log targets: the
log-score),
plus the last WINDOW context tokens in every head (KVzap's protected recent window, which
calibration leaves out of the fit; service.compression.selection.threshold_select), and the
context's ratio is the fraction it achieved.

Outside an ingest (`engine.score(full, "kvzap")`: re-scoring a stored context, the quality
bench) the attention inputs are recomputed by running the context once over its prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from service.compression.learned.predictor import (
    KVzapPredictor,
    check_fits,
    load_predictor,
    stored_predictor_path,
)
from service.compression.runner import ModelRunner
from service.compression.scorers.base import Progress, Scorer, truncated
from service.engine.attention_hook import attention_inputs
from service.engine.kvcache import CompressedContext

LOG_RANGE = (-80.0, 60.0)
"""Predicted log-scores are clamped here, so exp() stays finite and positive in fp32.
Below THRESHOLD_MAX (service.compression.selection), so a threshold above every prediction
still keeps the recent window, whose stored WINDOW_SCORE is above any clamped prediction."""

_LOADED: dict[tuple[str, int, str, str], KVzapPredictor] = {}


def predictor_dir(runner: ModelRunner) -> Path:
    """Where `kvzip calibrate-scorer` stores predictors: the config's `kvzap_dir`, by
    default <data_dir>/kvzap/ (beside head_scores_dir)."""
    config = runner.config
    return config.kvzap_dir or config.head_scores_dir.parent / "kvzap"


def stored_predictor(runner: ModelRunner) -> KVzapPredictor:
    """The runner's stored predictor (config.kvzap_kind, or the MLP when there is one) on the
    model's device and dtype, loaded once per file.

    InvalidInputError when the model has none or it does not fit the model's shapes.
    """
    directory, kind = predictor_dir(runner), runner.config.kvzap_kind
    path = stored_predictor_path(directory, runner.identity, kind)
    device, dtype = runner.model.device, runner.model.dtype
    key = (str(path), path.stat().st_mtime_ns, str(device), str(dtype))
    if key not in _LOADED:  # read the file only when it is new or changed
        stored = load_predictor(directory, runner.identity, kind)
        config = runner.model.config
        check_fits(stored, runner.n_layers, config.hidden_size, config.num_key_value_heads)
        if len(_LOADED) >= 4:  # a few files at most (a bench alternates linear and mlp)
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = stored.to(device, dtype)
    return _LOADED[key]


class KVzapScorer(Scorer):
    """Predicted KVzip scores: (H, n) per layer, computed while the prefill runs."""

    name = "kvzap"

    def __init__(self, predictor: KVzapPredictor | None = None) -> None:
        self.predictor = predictor  # None: the runner's stored one
        self._captured: dict[int, list[torch.Tensor]] | None = None

    def _ready(self, runner: ModelRunner) -> KVzapPredictor:
        if self.predictor is None:
            return stored_predictor(runner)
        return self.predictor.to(runner.model.device, runner.model.dtype)

    def check(self, runner: ModelRunner) -> None:
        """The model needs a predictor that fits it (`kvzip calibrate-scorer`)."""
        self._ready(runner)

    @contextmanager
    def capture(self, runner: ModelRunner) -> Iterator[None]:
        """While active, every attention module's input is scored as it goes by."""
        predictor = self._ready(runner)
        sink: dict[int, list[torch.Tensor]] = {}

        def predict(layer: int, hidden: torch.Tensor) -> None:
            sink.setdefault(layer, []).append(predictor.predict(layer, hidden[0]))

        with attention_inputs(runner.model, predict):
            yield
        self._captured = sink

    def score(
        self, runner: ModelRunner, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        captured, self._captured = self._captured, None
        if captured is None:  # not inside an ingest: run the context once over its prefix
            with self.capture(runner):
                s = full.prefix_len
                runner.forward(truncated(full, s), full.context_ids[s:].tolist())
            captured, self._captured = self._captured, None
        assert captured is not None
        n = full.context_len
        low, high = LOG_RANGE
        return [
            torch.cat(captured[i])[-n:].T.float().clamp(low, high).exp()
            for i in range(len(full.layers))
        ]
