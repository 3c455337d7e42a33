"""Scoring methods: one small class per `compression.method` (see base.Scorer).

kvzip       pair-level context reconstruction (the paper's main setting)
kvzip_plus  the same with the KVzip+ normalisation
kvzip_head  calibrated per-head scores, no scoring pass at ingest
kvzap       learned KVzip(+) predictor applied inside the prefill (no reconstruction)
streaming   attention sinks (the protected prefix) + the most recent tokens
snapkv      attention of the last 32 context tokens, pooled; the same budget in every head
h2o         heavy hitters (accumulated attention) + the most recent tokens, half each
"""

from __future__ import annotations

from service.compression.scorers.base import Scorer
from service.compression.scorers.h2o import H2OScorer
from service.compression.scorers.kvzap import KVzapScorer
from service.compression.scorers.kvzip import KVzipScorer
from service.compression.scorers.kvzip_head import KVzipHeadScorer, calibrate
from service.compression.scorers.kvzip_plus import KVzipPlusScorer
from service.compression.scorers.snapkv import SnapKVScorer
from service.compression.scorers.streaming import StreamingScorer
from service.errors import InvalidInputError

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (
        KVzipScorer,
        KVzipPlusScorer,
        KVzipHeadScorer,
        KVzapScorer,
        StreamingScorer,
        SnapKVScorer,
        H2OScorer,
    )
}

__all__ = ["SCORERS", "Scorer", "build_scorer", "calibrate"]


def build_scorer(method: str) -> Scorer:
    """The scorer of `method` (every method of service.config.METHODS but `none`)."""
    if method not in SCORERS:
        raise InvalidInputError(f"no scorer for method {method!r}; use one of {sorted(SCORERS)}")
    return SCORERS[method]()
