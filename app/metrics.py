"""Prometheus metrics of the HTTP layer, and the `/metrics` exposition of everything.

Names follow Prometheus and vLLM conventions in the `kvzip_` namespace: base units in the
name (`_seconds`, `_bytes`), `_total` on counters. Labels are small closed sets: the route
template (`/contexts/{context_id}`), never a context id; the method (one of HTTP_METHODS,
any other name is "other": clients choose it before auth); the status code.

HTTP layer (here):
    kvzip_http_requests_total{method,route,status}
    kvzip_http_request_duration_seconds{method,route,status}   (to the last byte, streams too)
    kvzip_time_to_first_token_seconds                          (per answered question)
    kvzip_inter_token_latency_seconds                          (per streamed chunk; one mean
                                                                sample per unstreamed answer)
Engine side (service.telemetry, same registry when the engine runs in this process):
    kvzip_ingest_phase_seconds{phase}, kvzip_compression_kept_ratio, kvzip_context_tokens,
    kvzip_request_queue_time_seconds, kvzip_queue_depth, kvzip_generation_tokens_total,
    kvzip_queries_cancelled_total, kvzip_ingests_total{outcome}, kvzip_decode_step_seconds,
    kvzip_decode_batch_rows, kvzip_decode_batch_size, kvzip_decode_waiting,
    kvzip_query_routes_total{route}                            (distributed API: affinity)
    kvzip_tier_{hits,misses,evictions}_total{tier}, kvzip_tier_bytes{tier}
In distributed mode a worker serves those on its own port (KVZIP_WORKER_METRICS_PORT), with
kvzip_worker_jobs_{claimed,completed,dead_lettered}_total{kind} and
kvzip_worker_heartbeat_timestamp_seconds; the API process adds kvzip_workers_live.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

from app.sse import aclose
from service.types import QueryEvent, QueryResult

__all__ = [
    "HTTP_METHODS",
    "HTTP_REQUESTS",
    "HTTP_SECONDS",
    "INTER_TOKEN_SECONDS",
    "TTFT_SECONDS",
    "method_label",
    "observe_answer",
    "observe_stream",
    "render",
]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""The methods that are their own `method` label; any other is counted as "other"."""

HTTP_REQUESTS = Counter(
    "kvzip_http_requests", "HTTP requests answered.", ["method", "route", "status"]
)
HTTP_SECONDS = Histogram(
    "kvzip_http_request_duration_seconds",
    "Seconds from the request's arrival to its last response byte.",
    ["method", "route", "status"],
    buckets=_LATENCY,
)
TTFT_SECONDS = Histogram(
    "kvzip_time_to_first_token_seconds",
    "Seconds from a question's arrival at the engine to its first generated token.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30, 60),
)
INTER_TOKEN_SECONDS = Histogram(
    "kvzip_inter_token_latency_seconds",
    "Seconds between successive streamed chunks of an answer.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5),
)


def method_label(method: str) -> str:
    """The `method` label of a request: the method itself if standard, else "other"."""
    return method if method in HTTP_METHODS else "other"


def observe_answer(result: QueryResult) -> None:
    """An unstreamed answer: its TTFT, and its mean inter-token latency once."""
    TTFT_SECONDS.observe(result.timings.ttft_s)
    if result.completion_tokens > 1:
        INTER_TOKEN_SECONDS.observe(result.timings.decode_s / (result.completion_tokens - 1))


async def observe_stream(events: AsyncIterator[QueryEvent]) -> AsyncIterator[QueryEvent]:
    """Pass `events` through, timing the gaps between text chunks and the final TTFT."""
    last: float | None = None
    try:
        async for event in events:
            if event.delta:
                now = time.perf_counter()
                if last is not None:
                    INTER_TOKEN_SECONDS.observe(now - last)
                last = now
            if event.result is not None:
                TTFT_SECONDS.observe(event.result.timings.ttft_s)
            yield event
    finally:
        await aclose(events)


def render() -> tuple[bytes, str]:
    """The exposition of the default registry and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
