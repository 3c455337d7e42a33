"""The compose stack as local processes: what docker-compose.yml and the images would run,
started here without Docker, and register -> query -> delete through the API ports.

Each process gets its service's own command and environment: the command is the image's
CMD (`kvzip serve`, `kvzip worker`) or the compose `command` (the two redis-server command
lines, run by the local redis-server binary), the environment is the image's ENV overlaid
with the service's `environment`, every `${VAR:-default}` at its default (the cpu profile).
Only what cannot be the same outside a container is replaced:

- host names and ports: redis-queue -> a redis-server on a free local port (or, with no
  redis-server binary, 127.0.0.1:6379 under a test key prefix); each API on a free port,
  bound to 127.0.0.1; the volumes (/data, /models) -> temporary folders;
- the model: the tiny random model of tests/conftest.py instead of SmolLM2-135M (seconds
  instead of a minute on 2 cores; `make compose-check` runs the real default model);
- `kvzip` and `kvzip-healthcheck` are this environment's (app.cli, docker/healthcheck.py).

Two API processes, one CPU worker: the context is registered through one API and asked
through the other; records go to redis-queue and the Redis tier to redis-cache; the
healthchecks answer; SIGTERM stops every process cleanly.
"""

from __future__ import annotations

import os
import shutil
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

from tests.deploy import flow
from tests.deploy.compose_testing import (
    DOCKERFILES,
    ROOT,
    environment,
    load_compose,
    parse_dockerfile,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(300)]

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_command(argv: list[str]) -> list[str]:
    """The image's command with this environment's programs."""
    if argv[0] == "kvzip":
        script = Path(sys.executable).with_name("kvzip")
        head = [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]
        return head + argv[1:]
    if argv[0] == "kvzip-healthcheck":
        return [sys.executable, str(ROOT / "docker/healthcheck.py"), *argv[1:]]
    return argv


@dataclass
class Stack:
    workdir: Path
    base_env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)
    urls: list[str] = field(default_factory=list)
    redis_urls: dict[str, str] = field(default_factory=dict)
    prefix: str = "kvzip:"
    worker_metrics: str = ""  # the worker's Prometheus endpoint

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.envs[name] = self.base_env | env
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            local_command(argv),
            cwd=self.workdir,
            env=self.envs[name],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def healthcheck(self, name: str, test: list[str]) -> int:
        assert test[0] == "CMD"
        done = subprocess.run(
            local_command(test[1:]), env=self.envs[name], capture_output=True, timeout=60
        )
        return done.returncode

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} (rc={proc.poll()}) ---\n"
            + "\n".join(
                (self.workdir / f"{name}.log").read_text(errors="replace").splitlines()[-25:]
            )
            for name, proc in self.procs.items()
        )

    def stop(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes


def redis_server_argv(command: list[str], port: int, data_dir: Path) -> list[str]:
    """The compose `command` of a Redis service, on a local port and folder."""
    argv = list(command)
    argv[argv.index("--port") + 1] = str(port)
    if "--dir" in argv:
        argv[argv.index("--dir") + 1] = str(data_dir)
    return [*argv, "--bind", "127.0.0.1", "--daemonize", "no", "--logfile", ""]


def wait_for_redis(url: str, stack: Stack, timeout_s: float = 20.0) -> None:
    client = redis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.1)
    finally:
        client.close()


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    compose = load_compose({"COMPOSE_PROFILES": "cpu"})
    services: dict[str, Any] = compose["services"]
    workdir = tmp_path_factory.mktemp("stack")
    (workdir / "data").mkdir()
    (workdir / "models").mkdir()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    base_env |= {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    stack = Stack(workdir, base_env)

    own_redis = shutil.which("redis-server") is not None
    prefix = "kvzip:"  # the default, on Redis servers of our own
    if own_redis:
        ports = {name: free_port() for name in ("redis-queue", "redis-cache")}
        for name, port in ports.items():
            folder = workdir / name
            folder.mkdir()
            stack.start(name, redis_server_argv(services[name]["command"], port, folder), {})
        redis_url = f"redis://127.0.0.1:{ports['redis-queue']}/0"
        cache_url = f"redis://127.0.0.1:{ports['redis-cache']}/0"
        for port in ports.values():
            wait_for_redis(f"redis://127.0.0.1:{port}/0", stack)
    else:
        redis_url = cache_url = SHARED_REDIS
        prefix = f"kvzip-test:{uuid4().hex}:"
    stack.redis_urls = {"redis-queue": redis_url, "redis-cache": cache_url}
    stack.prefix = prefix

    def replaced(env: dict[str, str]) -> dict[str, str]:
        assert env["KVZIP_REDIS_URL"] == "redis://redis-queue:6379/0"
        assert env["KVZIP_REDIS_CACHE_URL"] == "redis://redis-cache:6379/0"
        assert env["KVZIP_DATA_DIR"] == "/data"
        env = env | {
            "KVZIP_REDIS_URL": redis_url,
            "KVZIP_REDIS_CACHE_URL": cache_url,
            "KVZIP_DATA_DIR": str(workdir / "data"),
        }
        if not own_redis:
            env["KVZIP_REDIS_PREFIX"] = prefix
        if env.get("HF_HOME") == "/models":
            env["HF_HOME"] = str(workdir / "models")
        env.pop("PATH", None)
        return env

    worker_service = services["worker-cpu"]
    worker_image = parse_dockerfile(DOCKERFILES["worker"])
    worker_env = worker_image.env(worker_service["build"]["args"]) | environment(worker_service)
    assert worker_env["KVZIP_MODEL"] == "SmolLM2-135M-Instruct"
    assert worker_env["KVZIP_WORKER_METRICS_HOST"] == "0.0.0.0"  # scraped over the network
    metrics_port = free_port()  # here: loopback, a port of its own
    worker_env = replaced(worker_env) | {
        "KVZIP_MODEL": str(tiny_model_dir),
        "KVZIP_WORKER_METRICS_HOST": "127.0.0.1",
        "KVZIP_WORKER_METRICS_PORT": str(metrics_port),
    }
    stack.worker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"

    api_service = services["api"]
    api_image = parse_dockerfile(DOCKERFILES["api"])
    api_env = replaced(api_image.env() | environment(api_service))
    assert api_env["KVZIP_PORT"] == "8000" and api_service["ports"] == ["8000:8000"]
    try:
        stack.start("worker-cpu", worker_image.exec_form("CMD"), worker_env)
        for name in ("api-1", "api-2"):
            port = free_port()
            env = api_env | {"KVZIP_HOST": "127.0.0.1", "KVZIP_PORT": str(port)}
            stack.start(name, api_image.exec_form("CMD"), env)
            stack.urls.append(f"http://127.0.0.1:{port}")
        yield stack
    finally:
        stack.stop()
        if not own_redis:
            client = redis.Redis.from_url(SHARED_REDIS)
            leftovers = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if leftovers:
                client.unlink(*leftovers)
            client.close()


def test_register_query_delete_through_two_apis_and_one_cpu_worker(stack: Stack) -> None:
    try:
        result = flow.run(stack.urls, ready_timeout_s=150.0)
    except (AssertionError, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from exc
    assert result["context_tokens"] > 500
    assert result["kept_fraction"] == pytest.approx(0.3, abs=0.01)
    # a context kept: its Redis-tier copy is on redis-cache, its record on redis-queue
    body = {"text": flow.document().replace("48213", "77031"), "wait": True}
    created = httpx.post(f"{stack.urls[1]}/contexts", json=body, timeout=120)
    assert created.status_code == 201, created.text
    context_id = created.json()["id"]
    queue = redis.Redis.from_url(stack.redis_urls["redis-queue"])
    cache = redis.Redis.from_url(stack.redis_urls["redis-cache"])
    try:
        assert queue.exists(f"{stack.prefix}ctx:{context_id}")
        assert list(cache.scan_iter(match=f"{stack.prefix}blob:*{context_id}*"))
        if stack.redis_urls["redis-cache"] != stack.redis_urls["redis-queue"]:
            assert not list(queue.scan_iter(match=f"{stack.prefix}blob:*"))
    finally:
        queue.close()
        cache.close()
    dead = {n: p.returncode for n, p in stack.procs.items() if p.poll() is not None}
    assert not dead, f"{dead}\n{stack.logs()}"
    metrics = httpx.get(stack.worker_metrics, timeout=5).text  # what Prometheus scrapes
    assert 'kvzip_worker_jobs_completed_total{kind="ingest"}' in metrics


def test_the_compose_healthchecks_pass_on_the_running_services(stack: Stack) -> None:
    services = load_compose({"COMPOSE_PROFILES": "cpu"})["services"]
    assert stack.healthcheck("api-1", services["api"]["healthcheck"]["test"]) == 0
    assert stack.healthcheck("api-2", services["api"]["healthcheck"]["test"]) == 0
    assert stack.healthcheck("worker-cpu", services["worker-cpu"]["healthcheck"]["test"]) == 0
    other = stack.envs["worker-cpu"] | {"KVZIP_WORKER_NAME": "no-such-worker"}
    stack.envs["other"] = other
    assert stack.healthcheck("other", services["worker-cpu"]["healthcheck"]["test"]) == 1


def test_sigterm_stops_every_service_cleanly(stack: Stack) -> None:
    """What `docker compose stop` sends: each process finishes well within its grace period.
    The worker and Redis exit 0; uvicorn re-raises the signal after its graceful shutdown
    (exit status 143 in a container), so an API may end by SIGTERM once it has finished."""
    start = time.monotonic()
    codes = stack.stop()
    assert time.monotonic() - start < 30
    logs = stack.logs()
    assert codes["worker-cpu"] == 0 and codes["redis-queue"] == 0, f"{codes}\n{logs}"
    for name in ("api-1", "api-2"):
        assert codes[name] in (0, -signal.SIGTERM), f"{codes}\n{logs}"
        log = (stack.workdir / f"{name}.log").read_text()
        assert "Application shutdown complete" in log, logs
