"""The HTTP app in distributed mode: no tensor library in the API process, and a Redis that is
down or silent gives a quick 503 with a clear message (never a hang)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "safetensors", "numpy")
CONTEXT = "ctx_" + "0" * 32

PROGRAM = """
import sys
from fastapi.testclient import TestClient
import service.serving.distributed.remote
import service.serving.distributed.stream_worker
from app.main import create_app
from app.settings import Settings

settings = Settings(mode="distributed", redis_url="redis://127.0.0.1:6379/0", redis_prefix=PREFIX)
with TestClient(create_app(settings)) as client:
    ready = client.get("/readyz")
    assert ready.status_code == 503, ready.text
    created = client.post("/contexts", json={"text": "The pass key is 48213."})
    assert created.status_code == 503 and "no live worker" in created.text, created.text
    assert type(client.app.state.service).__name__ == "RemoteContextService"
heavy = [name for name in HEAVY if name in sys.modules]
assert not heavy, heavy
"""


@pytest.mark.redis
def test_the_distributed_api_never_imports_torch() -> None:
    prefix = f"kvzip-test:{uuid4().hex}:"
    program = f"PREFIX = {prefix!r}\nHEAVY = {HEAVY!r}\n" + PROGRAM
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def unreachable_redis(kind: str) -> Iterator[int]:
    """A port where no Redis answers: closed (refused at once), or silent (a listener that
    accepts connections and never replies, so only timeouts end a call)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if kind == "closed":
        listener.close()
    else:
        listener.listen(64)
    try:
        yield port
    finally:
        listener.close()


@pytest.mark.parametrize("kind", ["closed", "silent"])
def test_redis_unreachable_is_a_quick_503_with_the_reason(kind: str) -> None:
    with unreachable_redis(kind) as port:
        url = f"redis://127.0.0.1:{port}/0"
        settings = Settings(mode="distributed", redis_url=url)
        with TestClient(create_app(settings)) as client:  # starts although Redis is down
            calls = [
                ("POST", "/contexts", {"text": "The pass key is 48213."}),
                ("GET", f"/contexts/{CONTEXT}", None),
                ("POST", f"/contexts/{CONTEXT}/query", {"question": "What is the key?"}),
                ("GET", "/contexts", None),
            ]
            for method, path, body in calls if kind == "closed" else calls[:2]:
                start = time.monotonic()
                response = client.request(method, path, json=body)
                elapsed = time.monotonic() - start
                assert response.status_code == 503, (path, response.text)
                error = response.json()["error"]
                assert error["code"] == "engine_unavailable"
                assert f"Redis at {url} is unreachable" in error["message"]
                assert elapsed < 5.0, (path, elapsed)
            assert client.get("/readyz").status_code == 503
            assert client.get("/healthz").status_code == 200
