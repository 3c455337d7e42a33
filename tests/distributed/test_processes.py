"""Distributed mode as deployed: worker processes (`python -m app.cli worker`, tiny model) and
API processes (uvicorn, no model) joined by the real Redis, on a test prefix.

Two APIs + two workers register 20 documents at once (all READY once, none lost or doubled,
every question answered); each worker's metrics endpoint shows its engine series move after
an ingest and a query; a flushed Redis tier is refilled from the shared disk; a worker
SIGKILLed mid-ingest has its job finished by the other, READY exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
import redis

from tests.distributed.metrics_testing import scrape

# Its own deadline: the first test here also waits for 4 processes to start (~25 s).
pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/0"
CACHE_URL = "redis://127.0.0.1:6379/1"  # the Redis tier on "its own server": another database
QUESTION = {"question": "What is the pass key?", "max_new_tokens": 8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 150) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} (rc={self.popen.poll()}) ---\n" + "\n".join(
            text.splitlines()[-lines:]
        )


@dataclass
class Deployment:
    prefix: str
    env: dict[str, str]
    logs: Path
    redis: redis.Redis
    cache: redis.Redis
    apis: list[str] = field(default_factory=list)
    procs: dict[str, Proc] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)  # worker name -> its /metrics URL

    def spawn(self, name: str, args: list[str], **env: str) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = Proc(name, popen, log)
        return self.procs[name]

    def start_worker(self, name: str) -> Proc:
        port = free_port()
        self.metrics[name] = f"http://127.0.0.1:{port}/metrics"
        args = ["-m", "app.cli", "worker"]
        return self.spawn(name, args, KVZIP_WORKER_NAME=name, KVZIP_WORKER_METRICS_PORT=str(port))

    def live_metrics(self) -> list[str]:
        """The metrics URLs of the workers still running."""
        return [u for n, u in self.metrics.items() if self.procs[n].popen.poll() is None]

    def start_api(self, name: str) -> str:
        port = free_port()
        self.spawn(
            name,
            ["-m", "uvicorn", "--factory", "app.main:create_app", "--port", str(port)]
            + ["--host", "127.0.0.1", "--log-level", "warning"],
        )
        url = f"http://127.0.0.1:{port}"
        self.apis.append(url)
        return url

    def key(self, suffix: str) -> str:
        return f"{self.prefix}{suffix}"

    def ready_events(self) -> list[str]:
        entries = self.redis.xrange(self.key("events"))
        return [f[b"id"].decode() for _, f in entries if f[b"event"] == b"READY"]

    def record(self, context_id: str) -> dict[str, Any]:
        import json

        raw = self.redis.get(self.key(f"ctx:{context_id}"))
        assert raw is not None, context_id
        return dict(json.loads(raw))

    def diagnostics(self) -> str:
        return "\n".join([*(p.tail() for p in self.procs.values()), self.redis_state()])

    def redis_state(self) -> str:
        """Streams, groups and records under the prefix, for a failure's message."""
        import json

        lines = ["--- redis ---"]
        for kind in ("ingest", "query"):
            stream = self.key(f"jobs:{kind}")
            if self.redis.exists(stream):
                lines.append(f"{kind}: xlen={self.redis.xlen(stream)}")
                lines += [f"  group {g}" for g in self.redis.xinfo_groups(stream)]
                lines += [
                    f"  pending {p}"
                    for p in self.redis.xpending_range(stream, "workers", "-", "+", 50)
                ]
                lines += [f"  entry {e[0]!r}" for e in self.redis.xrange(stream)]
        for key in self.redis.scan_iter(match=self.key("ctx:*")):
            body = json.loads(self.redis.get(key) or b"{}")
            record = body.get("record", {})
            if record.get("state") != "READY":
                lines.append(
                    f"record {record.get('id')} {record.get('state')} {record.get('progress')}"
                )
        lines.append(f"events: {len(self.ready_events())} READY")
        return "\n".join(lines)

    def wait_ready(self, timeout_s: float = 150.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.apis)
        while pending:
            for url in list(pending):
                try:
                    if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                        pending.remove(url)
                except httpx.HTTPError:
                    pass
            dead = [p.name for p in self.procs.values() if p.popen.poll() is not None]
            assert not dead, f"exited: {dead}\n{self.diagnostics()}"
            assert time.monotonic() < deadline, f"not ready: {pending}\n{self.diagnostics()}"
            time.sleep(0.3)

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """Failures carry the tail of every process's log."""
        try:
            yield
        except (AssertionError, httpx.HTTPError) as exc:
            self.dump_stacks()
            raise AssertionError(f"{exc!r}\n{self.diagnostics()}") from exc

    def dump_stacks(self) -> None:
        """SIGUSR1 the workers (their asyncio tasks' stacks), then SIGABRT every live process
        (faulthandler writes each thread's stack): all into the logs."""
        for proc in self.procs.values():
            if proc.name.startswith("w") and proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGABRT)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                proc.popen.terminate()
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()


@pytest.fixture(scope="module")
def deployment(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    prefix = f"kvzip-test:{uuid4().hex}:"
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    env = base | {
        "KVZIP_MODE": "distributed",
        "KVZIP_REDIS_URL": REDIS_URL,
        "KVZIP_REDIS_CACHE_URL": CACHE_URL,
        "KVZIP_REDIS_PREFIX": prefix,
        "KVZIP_MODEL": str(tiny_model_dir),
        "KVZIP_DEVICE": "cpu",
        "KVZIP_DTYPE": "float32",
        "KVZIP_DATA_DIR": str(tmp_path_factory.mktemp("shared-volume")),
        "KVZIP_MEMORY_CACHE_BYTES": "0",  # every read goes to Redis or the shared disk
        "KVZIP_CHUNK_SIZE": "256",  # progress in small steps (the SIGKILL test watches it)
        "KVZIP_HEARTBEAT_TTL_S": "4",
        "KVZIP_CLAIM_IDLE_S": "3",
        "KVZIP_LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
        "PYTHONFAULTHANDLER": "1",
    }
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    cache = redis.Redis.from_url(CACHE_URL, socket_timeout=5)
    deployment = Deployment(prefix, env, tmp_path_factory.mktemp("logs"), client, cache)
    try:
        deployment.start_worker("w1")
        deployment.start_worker("w2")
        deployment.start_api("api1")
        deployment.start_api("api2")
        deployment.wait_ready()
        yield deployment
    finally:
        deployment.stop()
        for db in (client, cache):
            leftovers = list(db.scan_iter(match=f"{prefix}*", count=1000))
            if leftovers:
                db.unlink(*leftovers)
            db.close()


def document(i: int) -> str:
    lines = [f"Note {i}.{j}: the archive keeps letters, maps and ledgers." for j in range(6)]
    return "\n".join([*lines[:3], f"The pass key of file {i} is {10_000 + 37 * i}.", *lines[3:]])


async def test_twenty_documents_through_two_apis_and_two_workers(deployment: Deployment) -> None:
    api1, api2 = deployment.apis
    docs = [document(i) for i in range(20)]
    with deployment.explained():
        await register_and_ask(deployment, api1, api2, docs)


async def register_and_ask(deployment: Deployment, api1: str, api2: str, docs: list[str]) -> None:
    async with httpx.AsyncClient(timeout=120.0) as http:
        created = await asyncio.gather(
            *(
                http.post(f"{(api1, api2)[i % 2]}/contexts", json={"text": d})
                for i, d in enumerate(docs)
            )
        )
        assert [r.status_code for r in created] == [201] * 20, [r.text for r in created]
        ids = [r.json()["id"] for r in created]
        assert len(set(ids)) == 20, "two documents got one id"
        assert {r.json()["state"] for r in created} == {"READY"}
        again = await asyncio.gather(
            *(
                http.post(f"{(api2, api1)[i % 2]}/contexts", json={"text": d})
                for i, d in enumerate(docs)
            )
        )
        assert [r.status_code for r in again] == [200] * 20
        assert [r.json()["id"] for r in again] == ids
        assert sorted(deployment.ready_events()) == sorted(ids)  # 0 lost, 0 duplicated
        listed = (await http.get(f"{api2}/contexts", params={"page_size": 100})).json()
        assert sorted(c["id"] for c in listed["contexts"]) == sorted(ids)
        answers = await asyncio.gather(
            *(
                http.post(f"{(api1, api2)[i % 2]}/contexts/{cid}/query", json=QUESTION)
                for i, cid in enumerate(ids)
            )
        )
        assert [r.status_code for r in answers] == [200] * 20, [r.text for r in answers]
        for response in answers:
            body = response.json()
            assert isinstance(body["answer"], str)
            assert 1 <= body["usage"]["completion_tokens"] <= 8
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    workers = {deployment.record(cid)["worker"] for cid in ids}
    assert workers == {"w1", "w2"}, workers  # the work was spread over both


async def test_workers_serve_their_engine_metrics(deployment: Deployment) -> None:
    api1, api2 = deployment.apis
    before, api_before = scrape(*deployment.live_metrics()), scrape(f"{api2}/metrics")
    with deployment.explained():
        async with httpx.AsyncClient(timeout=60.0) as http:
            created = await http.post(f"{api1}/contexts", json={"text": document(500)})
            assert created.status_code == 201, created.text
            answer = await http.post(f"{api2}/contexts/{created.json()['id']}/query", json=QUESTION)
            assert answer.status_code == 200, answer.text
    grew = [  # summed over the workers: which one took which job does not matter
        'kvzip_ingest_phase_seconds_count{phase="scoring"}',
        'kvzip_ingest_phase_seconds_count{phase="store"}',
        'kvzip_ingests_total{outcome="ready"}',
        'kvzip_worker_jobs_claimed_total{kind="ingest"}',
        'kvzip_worker_jobs_claimed_total{kind="query"}',
        'kvzip_worker_jobs_completed_total{kind="ingest"}',
        'kvzip_worker_jobs_completed_total{kind="query"}',
        'kvzip_tier_misses_total{tier="resident"}',  # KVZIP_MEMORY_CACHE_BYTES=0
        "kvzip_context_tokens_sum",
        "kvzip_generation_tokens_total",
        "kvzip_decode_step_seconds_count",
        "kvzip_decode_batch_rows_count",
    ]
    deadline = time.monotonic() + 15  # a job is counted just after its reply is sent
    after = scrape(*deployment.live_metrics())
    while short := [k for k in grew if after[k] <= before[k]]:
        assert time.monotonic() < deadline, f"did not grow: {short}\n{deployment.diagnostics()}"
        await asyncio.sleep(0.2)
        after = scrape(*deployment.live_metrics())
    assert after['kvzip_tier_bytes{tier="disk"}'] > 0
    stored = [f'kvzip_tier_hits_total{{tier="{t}"}}' for t in ("redis", "disk")]
    assert sum(after[k] - before[k] for k in stored) >= 1  # the query read the stored blob
    for url in deployment.live_metrics():
        own = scrape(url)
        assert time.time() - own["kvzip_worker_heartbeat_timestamp_seconds"] < 10, url
        assert not any(k.startswith("kvzip_http_") for k in own), "HTTP series on a worker"
    api_after = scrape(f"{api2}/metrics")
    ttft = "kvzip_time_to_first_token_seconds_count"
    assert api_after[ttft] == api_before[ttft] + 1
    assert api_after["kvzip_workers_live"] == len(deployment.live_metrics())


async def test_a_flushed_cache_tier_still_answers_and_is_refilled(deployment: Deployment) -> None:
    api1, api2 = deployment.apis
    async with httpx.AsyncClient(timeout=60.0) as http:
        created = await http.post(f"{api1}/contexts", json={"text": document(99)})
        cid = created.json()["id"]
        blobs = list(deployment.cache.scan_iter(match=deployment.key(f"blob:{cid}*")))
        assert blobs, "the Redis tier holds no copy"
        assert not list(deployment.redis.scan_iter(match=deployment.key("blob:*")))
        deployment.cache.unlink(*blobs)  # FLUSH of the cache tier
        answer = await http.post(f"{api2}/contexts/{cid}/query", json=QUESTION)
        assert answer.status_code == 200, answer.text
    refilled = list(deployment.cache.scan_iter(match=deployment.key(f"blob:{cid}*")))
    assert sorted(refilled) == sorted(blobs)  # disk served it and promoted it back
    assert all(deployment.cache.pttl(k) > 0 for k in refilled)


async def test_a_worker_killed_mid_ingest_is_replaced_and_ready_exactly_once(
    deployment: Deployment,
) -> None:
    api1, _ = deployment.apis
    async with httpx.AsyncClient(timeout=60.0) as http:
        owner = None
        for attempt in range(4):  # an ingest may finish before it is seen scoring: again
            lines = [f"Line {i}: the orchard {attempt} keeps apples and pears." for i in range(170)]
            accepted = await http.post(
                f"{api1}/contexts", json={"text": "\n".join(lines), "wait": False}
            )
            assert accepted.status_code == 202, accepted.text
            cid = accepted.json()["id"]
            owner = await scoring_worker(deployment, http, f"{api1}/contexts/{cid}")
            if owner is not None:
                break
        assert owner is not None, "every ingest finished before it could be killed"
        assert deployment.record(cid)["record"]["state"] == "PROCESSING"
        os.kill(deployment.procs[owner].popen.pid, signal.SIGKILL)
        deployment.procs[owner].popen.wait()
        deadline = time.monotonic() + 90
        state = "PROCESSING"
        while state == "PROCESSING":
            assert time.monotonic() < deadline, deployment.diagnostics()
            await asyncio.sleep(0.3)
            state = (await http.get(f"{api1}/contexts/{cid}")).json()["state"]
        assert state == "READY", deployment.record(cid)
        answer = await http.post(f"{api1}/contexts/{cid}/query", json=QUESTION)
        assert answer.status_code == 200, answer.text
    survivor = ({"w1", "w2"} - {owner}).pop()
    assert deployment.record(cid)["worker"] == survivor
    assert deployment.ready_events().count(cid) == 1
    assert deployment.redis.xlen(deployment.key("jobs:dead")) == 0


async def scoring_worker(deployment: Deployment, http: httpx.AsyncClient, url: str) -> str | None:
    """The name of the worker that holds the ingest job while it runs; None when the ingest
    finished before that could be seen."""
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, deployment.diagnostics()
        pending = deployment.redis.xpending_range(
            deployment.key("jobs:ingest"), "workers", "-", "+", 10
        )
        info = (await http.get(url)).json()
        if info["state"] != "PROCESSING":
            return None
        if pending:  # a worker holds it and works on it (progress may not show yet)
            return str(pending[0]["consumer"].decode())
        await asyncio.sleep(0.05)
