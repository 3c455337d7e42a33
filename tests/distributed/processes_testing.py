"""Distributed mode as deployed, for tests: worker processes (`python -m app.cli worker`, the
tiny random model) and API processes (uvicorn, no model) joined by the real Redis on a test
prefix. Used by tests/distributed/test_processes.py and the fault suite (tests/faults).

Every wait has a deadline; `deployed` stops every process (SIGCONT first, then SIGTERM,
then SIGKILL) and unlinks every key of the prefix, even when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import redis

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/0"
CACHE_URL = "redis://127.0.0.1:6379/1"  # the Redis tier on "its own server": another database
QUESTION = {"question": "What is the pass key?", "max_new_tokens": 8}
STOP_S = 15.0  # the most a process may take to stop after SIGTERM (then SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def document(i: int) -> str:
    lines = [f"Note {i}.{j}: the archive keeps letters, maps and ledgers." for j in range(6)]
    return "\n".join([*lines[:3], f"The pass key of file {i} is {10_000 + 37 * i}.", *lines[3:]])


def until(condition: Callable[[], object], timeout_s: float, what: str) -> float:
    """Poll `condition` until it is true; the seconds it took (AssertionError past
    `timeout_s`)."""
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed < timeout_s, f"{what}: not within {timeout_s:g} s"
        time.sleep(0.05)
    return time.monotonic() - started


def client_name(prefix: str) -> str:
    """The name every Redis connection of a deployment's processes carries (CLIENT LIST)."""
    return prefix.rstrip(":")


def deployment_env(prefix: str, model_dir: Path, data_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of every process: this machine's, less its KVZIP_* variables, plus
    distributed mode on `prefix` (`settings`: more variables, by name)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    named = f"?client_name={client_name(prefix)}"
    return base | {
        "KVZIP_MODE": "distributed",
        "KVZIP_REDIS_URL": REDIS_URL + named,
        "KVZIP_REDIS_CACHE_URL": CACHE_URL + named,
        "KVZIP_REDIS_PREFIX": prefix,
        "KVZIP_MODEL": str(model_dir),
        "KVZIP_DEVICE": "cpu",
        "KVZIP_DTYPE": "float32",
        "KVZIP_DATA_DIR": str(data_dir),
        "KVZIP_MEMORY_CACHE_BYTES": "0",  # every read goes to Redis or the shared disk
        "KVZIP_CHUNK_SIZE": "256",  # progress in small steps (the SIGKILL tests watch it)
        "KVZIP_HEARTBEAT_TTL_S": "4",
        "KVZIP_CLAIM_IDLE_S": "3",
        "KVZIP_LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
        "PYTHONFAULTHANDLER": "1",
        **settings,
    }


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

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
    api_ports: dict[str, int] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)  # worker name -> its argv

    # -- processes ---------------------------------------------------------------------------

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

    def start_worker(self, name: str, command: list[str] | None = None) -> Proc:
        """A worker process (`command`: its Python arguments; by default those it had, or
        `-m app.cli worker`)."""
        port = free_port()
        self.metrics[name] = f"http://127.0.0.1:{port}/metrics"
        args = self.commands.setdefault(name, command or ["-m", "app.cli", "worker"])
        env = {"KVZIP_WORKER_NAME": name, "KVZIP_WORKER_METRICS_PORT": str(port)}
        return self.spawn(name, args, **env)

    def workers(self) -> list[str]:
        return [n for n in self.metrics if n in self.procs]

    def live_metrics(self) -> list[str]:
        """The metrics URLs of the workers still running."""
        return [u for n, u in self.metrics.items() if self.procs[n].alive()]

    def start_api(self, name: str, port: int | None = None, module: str | None = None) -> str:
        """An API process (on `port`, by default a free one; `module`: run as `python -m
        module PORT` instead of uvicorn on app.main); its URL."""
        port = port or free_port()
        self.api_ports[name] = port
        args = ["-m", "uvicorn", "--factory", "app.main:create_app", "--port", str(port)]
        args += ["--host", "127.0.0.1", "--log-level", "warning"]
        self.spawn(name, ["-m", module, str(port)] if module else args)
        url = f"http://127.0.0.1:{port}"
        if url not in self.apis:
            self.apis.append(url)
        return url

    def retire(self, name: str) -> None:
        """Stop a process (if it runs) and forget it: `revive` leaves it be."""
        proc = self.procs.pop(name)
        if proc.alive():
            proc.popen.kill()
            proc.popen.wait(timeout=STOP_S)
        if name in self.api_ports:
            self.apis.remove(f"http://127.0.0.1:{self.api_ports.pop(name)}")

    def kill(self, name: str) -> None:
        """SIGKILL: the process ends at once, acknowledging nothing."""
        proc = self.procs[name]
        os.kill(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(timeout=STOP_S)

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.procs[name].popen.pid, sig)

    def revive(self, timeout_s: float = 90.0) -> list[str]:
        """Restart every process that is not running (an API on its port), continue every
        stopped one, and wait until each worker beats and each API is ready again; the
        names restarted."""
        dead = [n for n, p in self.procs.items() if not p.alive()]
        for name, proc in self.procs.items():
            if name not in dead:
                os.kill(proc.popen.pid, signal.SIGCONT)
        for name in dead:
            if name in self.api_ports:
                self.start_api(name, self.api_ports[name])
            else:
                self.start_worker(name)
        self.wait_beating(self.workers(), timeout_s)
        self.wait_ready(timeout_s)
        return dead

    def wait_beating(self, names: list[str], timeout_s: float) -> float:
        def beating() -> bool:
            self.assert_running()
            return all(self.redis.exists(self.key(f"worker:{n}")) for n in names)

        return until(beating, timeout_s, f"heartbeats of {names}\n{self.diagnostics()}")

    def assert_running(self) -> None:
        dead = [p.name for p in self.procs.values() if not p.alive()]
        assert not dead, f"exited: {dead}\n{self.diagnostics()}"

    def wait_ready(self, timeout_s: float = 150.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.apis)
        while pending:
            for url in list(pending):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                        pending.remove(url)
            self.assert_running()
            assert time.monotonic() < deadline, f"not ready: {pending}\n{self.diagnostics()}"
            time.sleep(0.3)

    def stop(self) -> None:
        """Every process ends: continued (a SIGSTOPped one ignores SIGTERM), terminated,
        killed after STOP_S."""
        for proc in self.procs.values():
            if proc.alive():
                os.kill(proc.popen.pid, signal.SIGCONT)
                proc.popen.terminate()
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=STOP_S)

    # -- Redis -------------------------------------------------------------------------------

    def key(self, suffix: str) -> str:
        return f"{self.prefix}{suffix}"

    def ready_events(self) -> list[str]:
        entries = self.redis.xrange(self.key("events"))
        return [f[b"id"].decode() for _, f in entries if f[b"event"] == b"READY"]

    def record(self, context_id: str) -> dict[str, Any]:
        raw = self.redis.get(self.key(f"ctx:{context_id}"))
        assert raw is not None, context_id
        return dict(json.loads(raw))

    def job_streams(self) -> list[str]:
        """The shared job streams and every worker's own query stream."""
        direct = [f"jobs:direct:{n}" for n in self.workers()]
        return [self.key(s) for s in ("jobs:ingest", "jobs:query", *direct)]

    def holders(self) -> list[str]:
        """The workers holding an unacknowledged job, any stream."""
        found = []
        for stream in self.job_streams():
            with contextlib.suppress(redis.ResponseError):  # no such stream (yet)
                rows = self.redis.xpending_range(stream, "workers", "-", "+", 50)
                found += [r["consumer"].decode() for r in rows]
        return found

    def unlink_prefix(self) -> int:
        """Unlink every key of this deployment, in both databases: what FLUSHALL does to
        it (and nothing to anyone else's keys); how many were removed."""
        removed = 0
        for db in (self.redis, self.cache):
            keys = list(db.scan_iter(match=f"{self.prefix}*", count=1000))
            removed += db.unlink(*keys) if keys else 0
        return removed

    def drop_connections(self) -> int:
        """CLIENT KILL every Redis connection of the deployment's processes (as a restart of
        the server does); how many there were."""
        name = client_name(self.prefix)
        ids = [c["id"] for c in self.redis.client_list() if c.get("name") == name]
        for client_id in ids:
            self.redis.client_kill_filter(_id=client_id)
        return len(ids)

    # -- failures explained ------------------------------------------------------------------

    def diagnostics(self) -> str:
        return "\n".join([*(p.tail() for p in self.procs.values()), self.redis_state()])

    def redis_state(self) -> str:
        """Streams, groups and records under the prefix, for a failure's message."""
        lines = ["--- redis ---"]
        for stream in self.job_streams():
            if self.redis.exists(stream):
                lines.append(f"{stream}: xlen={self.redis.xlen(stream)}")
                lines += [f"  group {g}" for g in self.redis.xinfo_groups(stream)]
                lines += [
                    f"  pending {p}"
                    for p in self.redis.xpending_range(stream, "workers", "-", "+", 50)
                ]
                lines += [f"  entry {e[0]!r}" for e in self.redis.xrange(stream, count=20)]
        for key in self.redis.scan_iter(match=self.key("ctx:*")):
            record = json.loads(self.redis.get(key) or b"{}").get("record", {})
            if record.get("state") != "READY":
                lines.append(
                    f"record {record.get('id')} {record.get('state')} {record.get('progress')}"
                )
        lines.append(f"events: {len(self.ready_events())} READY")
        return "\n".join(lines)

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
        for name in self.workers():
            if self.procs[name].alive():
                self.signal(name, signal.SIGCONT)
                self.signal(name, signal.SIGUSR1)
        time.sleep(1.0)
        for proc in self.procs.values():
            if proc.alive():
                proc.popen.send_signal(signal.SIGABRT)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)


@contextlib.contextmanager
def deployed(
    model_dir: Path,
    tmp: Path,
    workers: list[str],
    apis: list[str],
    worker_command: list[str] | None = None,
    **settings: str,
) -> Iterator[Deployment]:
    """Workers (`worker_command`: their Python arguments, see `start_worker`) and APIs on a
    fresh prefix, all ready; everything stopped and every key of the prefix unlinked
    afterwards (failed or not). The shared volume is `tmp / "shared-volume"`."""
    prefix = f"kvzip-test:{uuid4().hex}:"
    (tmp / "logs").mkdir(exist_ok=True)
    env = deployment_env(prefix, model_dir, tmp / "shared-volume", **settings)
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    cache = redis.Redis.from_url(CACHE_URL, socket_timeout=5)
    deployment = Deployment(prefix, env, tmp / "logs", client, cache)
    try:
        for name in workers:
            deployment.start_worker(name, worker_command)
        for name in apis:
            deployment.start_api(name)
        deployment.wait_ready()
        yield deployment
    finally:
        deployment.stop()
        try:
            deployment.unlink_prefix()
        finally:
            client.close()
            cache.close()
