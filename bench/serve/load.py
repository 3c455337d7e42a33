"""HTTP load generator: streamed questions against a running service, timed per request.

    summary = asyncio.run(run_scenario(base_url, Scenario("c4-different", ids, concurrency=4)))

Every request is `POST /contexts/{id}/query` with `"stream": true`, greedy
(`temperature` 0) and a fixed `max_new_tokens`; contexts are taken round-robin from the
scenario's list (one id: the same-context scenario; several: different contexts).

Two arrival modes:
- fixed concurrency N: N workers, each sending its next request when the previous one
  ends, until `duration_s` has passed or `requests` have been started;
- open loop (`rate` req/s): Poisson arrivals (exponential gaps, seeded) for `duration_s`
  (or `requests` arrivals), each request its own task whatever the server's backlog.

Requests still running when the window closes are allowed to finish (each has its own
`request_timeout_s`, and the drain as a whole `drain_timeout_s`); the scenario's wall time
runs from its start to the end of its last request.

What is measured, per request, on the client's clock (time.perf_counter):
- TTFT: from sending the request to the first SSE event with a non-empty `delta`;
- e2e: from sending to the end of the stream (`[DONE]`);
- ITL: the gaps between consecutive content deltas. The server sends one delta per
  generated token unless a token does not finish a character (or could begin a stop
  string): then one delta carries several tokens. So each gap is divided by the request's
  tokens per gap, `(completion_tokens - 1) / (deltas - 1)` (1 when every delta is one
  token), which keeps the mean ITL of a request equal to (last delta - first delta) /
  (completion_tokens - 1). p50/p99 are over all gaps of all successful requests.
- output tokens: `usage.completion_tokens` of the final event (not the delta count).
Output tokens/s = sum of completion tokens of successful requests / scenario wall time.
Errors are counted by HTTP status (`"503"`), by exception type for transport failures and
timeouts (`"ReadTimeout"`, `"TimeoutError"`), and as `"stream:<code>"` for an error event
after the 200. A refusal's Retry-After header is kept; with `honour_retry_after` a closed-loop
worker waits that long before its next request (as a well-behaved client does).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

__all__ = [
    "DEFAULT_QUESTION",
    "RequestRecord",
    "Scenario",
    "percentiles",
    "run_scenario",
    "summarize",
]

DEFAULT_QUESTION = "Summarise the document."


@dataclass(frozen=True)
class Scenario:
    """One load pattern. Exactly one of `concurrency` or `rate` is set."""

    name: str
    context_ids: tuple[str, ...]
    kind: str = "different"  # a label: "same" or "different" contexts
    concurrency: int | None = None
    rate: float | None = None  # open-loop Poisson arrivals per second
    duration_s: float = 30.0
    requests: int | None = None  # stop after this many requests (before duration_s)
    new_tokens: int = 32
    questions: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per context id
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 600.0
    seed: int = 0
    honour_retry_after: bool = False  # closed loop: a refused worker waits Retry-After

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency or rate")
        if not self.context_ids:
            raise ValueError("a scenario needs at least one context id")


@dataclass
class RequestRecord:
    """One request's timings (seconds; `start_s` from the scenario's start)."""

    index: int
    context_id: str
    start_s: float
    status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    deltas: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    server_ttft_s: float | None = None
    retry_after: str | None = None  # the Retry-After header of a refusal
    delta_times_s: list[float] = field(default_factory=list)  # from the request's start

    @property
    def ok(self) -> bool:
        return self.error is None

    def itl_samples(self) -> list[float]:
        """Per-token inter-token gaps (see the module docstring)."""
        times = self.delta_times_s
        if len(times) < 2 or self.completion_tokens < 2:
            return []
        per_gap = max((self.completion_tokens - 1) / (len(times) - 1), 1.0)
        return [(b - a) / per_gap for a, b in itertools.pairwise(times)]


async def run_scenario(
    base_url: str, scenario: Scenario, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `scenario` against `base_url`; returns {"summary": ..., "records": [...]}."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(scenario.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        start = time.perf_counter()
        jobs = _jobs(scenario)
        if scenario.concurrency is not None:
            records = await _closed_loop(client, scenario, jobs, start)
        else:
            records = await _open_loop(client, scenario, jobs, start)
        wall = max((r.start_s + (r.e2e_s or 0.0) for r in records), default=0.0)
    return {
        "summary": summarize(scenario, records, wall),
        "records": [asdict(r) for r in records],
    }


def _jobs(scenario: Scenario) -> Iterator[tuple[int, str, str]]:
    """(index, context id, question) for every request: contexts round-robin, and each
    context's questions round-robin (DEFAULT_QUESTION for a context without any)."""
    ids = itertools.cycle(scenario.context_ids)
    asked = {
        cid: itertools.cycle(scenario.questions.get(cid) or (DEFAULT_QUESTION,))
        for cid in scenario.context_ids
    }
    counter = itertools.count() if scenario.requests is None else iter(range(scenario.requests))
    for i in counter:
        cid = next(ids)
        yield i, cid, next(asked[cid])


async def _closed_loop(
    client: httpx.AsyncClient, scenario: Scenario, jobs: Iterator[tuple[int, str, str]], t0: float
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    deadline = t0 + scenario.duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            job = next(jobs, None)
            if job is None:
                return
            record = await _request(client, scenario, job, t0)
            records.append(record)
            if scenario.honour_retry_after and record.retry_after is not None:
                await _wait_retry_after(record.retry_after, deadline)

    assert scenario.concurrency is not None
    workers = [asyncio.create_task(worker()) for _ in range(scenario.concurrency)]
    await _drain(workers, scenario.duration_s + scenario.drain_timeout_s)
    return sorted(records, key=lambda r: r.index)


async def _wait_retry_after(retry_after: str, deadline: float) -> None:
    """Sleep the refusal's Retry-After seconds, but not past the scenario's window."""
    with contextlib.suppress(ValueError):
        wait = min(float(retry_after), deadline - time.perf_counter())
        await asyncio.sleep(max(wait, 0.0))


async def _open_loop(
    client: httpx.AsyncClient, scenario: Scenario, jobs: Iterator[tuple[int, str, str]], t0: float
) -> list[RequestRecord]:
    assert scenario.rate is not None
    rng = random.Random(scenario.seed)
    tasks: list[asyncio.Task[RequestRecord]] = []
    at = 0.0
    for job in jobs:
        at += rng.expovariate(scenario.rate)
        if at >= scenario.duration_s:
            break
        await asyncio.sleep(max(t0 + at - time.perf_counter(), 0.0))
        tasks.append(asyncio.create_task(_request(client, scenario, job, t0)))
    await _drain(tasks, scenario.drain_timeout_s)
    return [t.result() for t in tasks if t.done() and not t.cancelled()]


async def _drain(tasks: list[asyncio.Task[Any]], timeout_s: float) -> None:
    """Wait for `tasks` at most `timeout_s`, then cancel what is left."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*pending, return_exceptions=True)


async def _request(
    client: httpx.AsyncClient, scenario: Scenario, job: tuple[int, str, str], t0: float
) -> RequestRecord:
    index, cid, question = job
    body = {
        "question": question,
        "max_new_tokens": scenario.new_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    sent = time.perf_counter()
    record = RequestRecord(index=index, context_id=cid, start_s=sent - t0)
    try:
        async with asyncio.timeout(scenario.request_timeout_s):
            await _stream(client, f"/contexts/{cid}/query", body, record, sent)
    except (httpx.HTTPError, TimeoutError) as exc:
        record.error = record.error or type(exc).__name__
    record.e2e_s = time.perf_counter() - sent
    return record


async def _stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], record: RequestRecord, sent: float
) -> None:
    async with client.stream("POST", path, json=body) as response:
        record.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            record.error = str(response.status_code)
            record.retry_after = response.headers.get("retry-after")
            return
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter() - sent
            if line == "data: [DONE]":
                done = True
                break
            _take_event(json.loads(line[6:]), record, now)
        if not done and record.error is None:
            record.error = "stream:truncated"


def _take_event(payload: dict[str, Any], record: RequestRecord, now: float) -> None:
    if "error" in payload:
        record.error = f"stream:{payload['error'].get('code', 'error')}"
    elif payload.get("delta"):
        record.ttft_s = now if record.ttft_s is None else record.ttft_s
        record.deltas += 1
        record.delta_times_s.append(now)
    elif "usage" in payload:
        record.completion_tokens = int(payload["usage"]["completion_tokens"])
        record.finish_reason = payload.get("finish_reason")
        record.server_ttft_s = (payload.get("timings") or {}).get("ttft_s")


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    arr = np.asarray(values, dtype=float)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
    }


def summarize(scenario: Scenario, records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    """The scenario's numbers: counts, errors by kind, tokens/s and latency percentiles."""
    ok = [r for r in records if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "name": scenario.name,
        "kind": scenario.kind,
        "mode": "concurrency" if scenario.concurrency is not None else "poisson",
        "concurrency": scenario.concurrency,
        "rate": scenario.rate,
        "contexts": len(scenario.context_ids),
        "new_tokens": scenario.new_tokens,
        "duration_s": scenario.duration_s,
        "wall_s": wall_s,
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(Counter(r.error for r in records if r.error is not None)),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "mean_completion_tokens": tokens / len(ok) if ok else 0.0,
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": percentiles([g for r in ok for g in r.itl_samples()]),
        "e2e_s": percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
        "server_ttft_s": percentiles([r.server_ttft_s for r in ok if r.server_ttft_s]),
    }
