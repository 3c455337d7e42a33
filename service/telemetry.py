"""Prometheus metrics of the engine side (no torch here): ingest phases, compression, queue
time, generated tokens, and the counters of every storage tier.

Everything lives in prometheus-client's default registry under the `kvzip_` namespace, so the
HTTP layer's `/metrics` renders it with its own request metrics. No metric has a context id
as a label: labels are small closed sets (phase, tier, outcome).

Tier counters are plain ints kept by each tier (`hits`, `misses`, `evictions`, `corruptions`,
`bytes_used`); `track_tier(name, tier)` lists a live tier (weakly) and the collector reads
them at scrape time, summing over the tiers of one name.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "COMPRESSION_KEPT_RATIO",
    "CONTEXT_TOKENS",
    "GENERATED_TOKENS",
    "INGESTS",
    "INGEST_PHASE_SECONDS",
    "QUERIES_CANCELLED",
    "QUEUE_TIME",
    "track_tier",
    "track_worker",
]

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

INGEST_PHASE_SECONDS = Histogram(
    "kvzip_ingest_phase_seconds",
    "Seconds spent in each ingest phase (prefill, scoring, selection, store).",
    ["phase"],
    buckets=_SECONDS,
)
INGESTS = Counter(
    "kvzip_ingests", "Finished ingests by outcome (ready, failed, aborted).", ["outcome"]
)
COMPRESSION_KEPT_RATIO = Histogram(
    "kvzip_compression_kept_ratio",
    "Achieved kept fraction of context KV pairs per ingested context.",
    buckets=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
CONTEXT_TOKENS = Histogram(
    "kvzip_context_tokens",
    "Document tokens per ingested context.",
    buckets=tuple(2.0**k for k in range(6, 18)),
)
QUEUE_TIME = Histogram(
    "kvzip_request_queue_time_seconds",
    "Seconds an engine job waited in the queue before the engine thread took it.",
    buckets=_SECONDS,
)
GENERATED_TOKENS = Counter("kvzip_generation_tokens", "Answer tokens generated.")
QUERIES_CANCELLED = Counter(
    "kvzip_queries_cancelled", "Generations stopped early because the client went away."
)
BATCH_ROWS = Histogram(
    "kvzip_decode_batch_rows",
    "Rows (requests) decoded together per scheduler iteration.",
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128),
)


_tiers: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()
_workers: weakref.WeakSet[object] = weakref.WeakSet()
_schedulers: weakref.WeakSet[object] = weakref.WeakSet()
_lock = threading.Lock()


def track_tier(name: str, tier: object) -> None:
    """Report `tier`'s counters under `tier="<name>"` for as long as it lives."""
    with _lock:
        _tiers[tier] = name


def track_worker(worker: object) -> None:
    """Report `worker.queued` (jobs admitted, running or waiting) as the queue depth."""
    with _lock:
        _workers.add(worker)


def track_scheduler(scheduler: object) -> None:
    """Report `len(scheduler.waiting)` and `scheduler.batch_size` as gauges."""
    with _lock:
        _schedulers.add(scheduler)


class _StateCollector(Collector):
    """Reads the tracked tiers and workers at scrape time."""

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with _lock:
            tiers = list(_tiers.items())
            workers = list(_workers)
            schedulers = list(_schedulers)
        families = {
            "hits": CounterMetricFamily(
                "kvzip_tier_hits", "Reads served by a tier.", labels=["tier"]
            ),
            "misses": CounterMetricFamily(
                "kvzip_tier_misses", "Reads a tier could not serve.", labels=["tier"]
            ),
            "evictions": CounterMetricFamily(
                "kvzip_tier_evictions", "Entries a tier dropped to make room.", labels=["tier"]
            ),
            "corruptions": CounterMetricFamily(
                "kvzip_tier_corruptions",
                "Damaged copies a tier found on read (failed checksum, truncated) and removed.",
                labels=["tier"],
            ),
        }
        size = GaugeMetricFamily("kvzip_tier_bytes", "Bytes held by a tier.", labels=["tier"])
        totals: dict[str, dict[str, int]] = {}
        for tier, name in tiers:
            row = totals.setdefault(
                name, dict.fromkeys(("hits", "misses", "evictions", "corruptions", "bytes"), 0)
            )
            for field in ("hits", "misses", "evictions", "corruptions"):
                row[field] += int(getattr(tier, field, 0))
            row["bytes"] += int(getattr(tier, "bytes_used", 0))
        for name, row in sorted(totals.items()):
            for field, family in families.items():
                family.add_metric([name], row[field])
            size.add_metric([name], row["bytes"])
        yield from families.values()
        yield size
        depth = GaugeMetricFamily(
            "kvzip_queue_depth", "Engine jobs admitted and not finished (running + waiting)."
        )
        depth.add_metric([], sum(int(getattr(w, "queued", 0)) for w in workers))
        yield depth
        waiting = GaugeMetricFamily(
            "kvzip_decode_waiting", "Questions waiting for a row of the decode batch."
        )
        waiting.add_metric([], sum(len(getattr(s, "waiting", ())) for s in schedulers))
        yield waiting
        rows = GaugeMetricFamily("kvzip_decode_batch_size", "Rows decoding right now.")
        rows.add_metric([], sum(int(getattr(s, "batch_size", 0)) for s in schedulers))
        yield rows


REGISTRY.register(_StateCollector())
