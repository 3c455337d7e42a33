"""Prometheus metrics of the engine side (no torch here): ingest phases, compression, queue
time, decode steps and batches, generated tokens, the counters of every storage tier, and a
distributed worker's jobs and heartbeat.

Everything lives in prometheus-client's default registry under the `kvzip_` namespace, so the
HTTP layer's `/metrics` renders it with its own request metrics (embedded mode); a worker
process serves the same registry on its own port (`KVZIP_WORKER_METRICS_PORT`, started by
`kvzip worker`). No metric has a context id as a label: labels are small closed sets (phase,
tier, outcome, kind).

Tier counters are plain ints kept by each tier (`hits`, `misses`, `evictions`, `corruptions`,
`bytes_used`);
`track_tier(name, tier)` lists a live tier (weakly) and the collector reads them at scrape
time, summing over the tiers of one name (`kvzip_tier_bytes` only for tiers that count their
bytes: the Redis tier's size is the Redis server's own). `track_cluster(api)` reports the
workers an API process sees beating (`kvzip_workers_live`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "BATCH_ROWS",
    "COMPRESSION_KEPT_RATIO",
    "CONTEXT_TOKENS",
    "DECODE_STEP_SECONDS",
    "GENERATED_TOKENS",
    "INGESTS",
    "INGEST_PHASE_SECONDS",
    "JOBS_CLAIMED",
    "JOBS_COMPLETED",
    "JOBS_DEAD_LETTERED",
    "QUERIES_CANCELLED",
    "QUERY_ROUTES",
    "QUEUE_TIME",
    "WORKER_HEARTBEAT",
    "track_cluster",
    "track_scheduler",
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
QUERY_ROUTES = Counter(
    "kvzip_query_routes",
    "Distributed mode, API side: query jobs sent to the worker holding their context "
    "resident (route=holder) or to any worker (route=any).",
    ["route"],
)
BATCH_ROWS = Histogram(
    "kvzip_decode_batch_rows",
    "Rows (requests) decoded together per scheduler iteration.",
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128),
)
DECODE_STEP_SECONDS = Histogram(
    "kvzip_decode_step_seconds",
    "Seconds of one batched decode step (every decoding row one token, sampled).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5),
)
# a distributed worker's jobs, by kind (ingest, query)
JOBS_CLAIMED = Counter(
    "kvzip_worker_jobs_claimed",
    "Job entries a worker took: new, its own after a restart, or a dead worker's.",
    ["kind"],
)
JOBS_COMPLETED = Counter(
    "kvzip_worker_jobs_completed",
    "Jobs a worker acknowledged as done for good (answered, READY, failed on their input, "
    "or nothing left to do).",
    ["kind"],
)
JOBS_DEAD_LETTERED = Counter(
    "kvzip_worker_jobs_dead_lettered",
    "Jobs a worker moved to the dead-letter stream (delivered too often, or malformed).",
    ["kind"],
)
WORKER_HEARTBEAT = Gauge(
    "kvzip_worker_heartbeat_timestamp_seconds",
    "Unix time of the worker's last heartbeat written to Redis.",
)


_tiers: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()
_workers: weakref.WeakSet[object] = weakref.WeakSet()
_schedulers: weakref.WeakSet[object] = weakref.WeakSet()
_clusters: weakref.WeakSet[object] = weakref.WeakSet()
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


def track_cluster(api: object) -> None:
    """Report `len(api.workers)` (the live heartbeats an API process sees) as a gauge."""
    with _lock:
        _clusters.add(api)


class _StateCollector(Collector):
    """Reads the tracked tiers, engine threads, schedulers and API processes at scrape time."""

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with _lock:
            tiers = list(_tiers.items())
            workers, schedulers, clusters = list(_workers), list(_schedulers), list(_clusters)
        yield from _tier_families(tiers)
        yield _gauge(
            "kvzip_queue_depth",
            "Engine jobs admitted and not finished (running + waiting).",
            sum(int(getattr(w, "queued", 0)) for w in workers),
        )
        yield _gauge(
            "kvzip_decode_waiting",
            "Questions waiting for a row of the decode batch.",
            sum(len(getattr(s, "waiting", ())) for s in schedulers),
        )
        yield _gauge(
            "kvzip_decode_batch_size",
            "Rows decoding right now.",
            sum(int(getattr(s, "batch_size", 0)) for s in schedulers),
        )
        if clusters:  # an API process of distributed mode
            yield _gauge(
                "kvzip_workers_live",
                "Workers whose heartbeat this API process saw live at its last look.",
                max(len(getattr(c, "workers", ())) for c in clusters),
            )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _tier_families(
    tiers: list[tuple[object, str]],
) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """Hits, misses, evictions, corruptions and bytes held, summed over the tiers of one name."""
    counters = {
        "hits": CounterMetricFamily("kvzip_tier_hits", "Reads served by a tier.", labels=["tier"]),
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
    sized: set[str] = set()
    for tier, name in tiers:
        row = totals.setdefault(name, dict.fromkeys((*counters, "bytes"), 0))
        for field in counters:
            row[field] += int(getattr(tier, field, 0))
        if hasattr(tier, "bytes_used"):
            sized.add(name)
            row["bytes"] += int(tier.bytes_used)
    for name, row in sorted(totals.items()):
        for field, family in counters.items():
            family.add_metric([name], row[field])
        if name in sized:
            size.add_metric([name], row["bytes"])
    yield from counters.values()
    yield size


REGISTRY.register(_StateCollector())
