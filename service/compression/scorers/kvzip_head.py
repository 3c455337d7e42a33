"""`kvzip_head`: context-independent head-level KVzip (KVZIP.md, "Head-level variant").

`calibrate` runs pair-level KVzip scoring on calibration texts once per model and keeps,
per (layer, KV head), the max of its pair scores over the sequence (several texts:
elementwise max). The (L, H) result is stored as safetensors under
`<data_dir>/head_scores/<model fingerprint>.safetensors`. At ingest every context pair of
head (l, h) gets that head's score, so there is no scoring pass: the global selection keeps
whole heads above the threshold, and the head at the boundary keeps its earliest pairs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from service.compression.runner import ModelRunner
from service.compression.scorers.base import Progress, Scorer
from service.compression.scorers.kvzip import KVzipScorer
from service.config import CompressionConfig
from service.engine.fingerprints import ModelIdentity
from service.engine.kvcache import CompressedContext
from service.errors import InvalidInputError

TENSOR = "head_scores"


def head_scores_path(directory: Path, identity: ModelIdentity) -> Path:
    """Where the head scores of this model live: keyed by its weights/config fingerprint."""
    return Path(directory) / f"{identity.model_fingerprint[:32]}.safetensors"


def calibrate(runner: ModelRunner, texts: Iterable[str], chunk_size: int = 2000) -> torch.Tensor:
    """(L, H) fp32: per head, the max pair-level KVzip score over every calibration text."""
    best: torch.Tensor | None = None
    for text in texts:
        doc = runner.encode_document(text)
        full = runner.prefill_context(doc, CompressionConfig("kvzip", 1.0, chunk_size))
        per_layer = KVzipScorer().score(runner, full)
        heads = torch.stack([layer.amax(dim=1) for layer in per_layer]).float().cpu()
        best = heads if best is None else torch.maximum(best, heads)
    if best is None:
        raise InvalidInputError("calibration needs at least one text")
    return best


def save_head_scores(directory: Path, identity: ModelIdentity, scores: torch.Tensor) -> Path:
    """Write (L, H) head scores for this model; returns the file written."""
    path = head_scores_path(directory, identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {TENSOR: scores.float().contiguous()},
        str(tmp),
        metadata={"model": identity.name, "model_fingerprint": identity.model_fingerprint},
    )
    tmp.replace(path)
    return path


def load_head_scores(directory: Path, identity: ModelIdentity) -> torch.Tensor:
    """(L, H) head scores of this model; InvalidInputError when it was never calibrated."""
    path = head_scores_path(directory, identity)
    if not path.exists():
        raise InvalidInputError(
            f"method kvzip_head needs head scores for model {identity.name!r}, calibrated "
            f"once: run `kvzip calibrate --text FILE` (expected {path})"
        )
    return load_file(str(path))[TENSOR]


class KVzipHeadScorer(Scorer):
    """Calibrated per-head scores broadcast over the context: (H, n) per layer."""

    name = "kvzip_head"

    def check(self, runner: ModelRunner) -> None:
        """The model must have been calibrated (`kvzip calibrate`)."""
        load_head_scores(runner.config.head_scores_dir, runner.identity)

    def score(
        self, runner: ModelRunner, full: CompressedContext, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        heads = load_head_scores(runner.config.head_scores_dir, runner.identity)
        if heads.shape != (len(full.layers), full.layers[0].n_heads):
            raise InvalidInputError(f"stored head scores have shape {tuple(heads.shape)}")
        n = full.context_len
        return [
            heads[i].to(layer.keys.device).unsqueeze(1).expand(-1, n).clone()
            for i, layer in enumerate(full.layers)
        ]
