"""Request ids, structured logs, and the Prometheus exposition."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.cli import main as kvzip
from app.logs import JsonFormatter, RequestIdFilter, request_id

if TYPE_CHECKING:
    from tests.app.conftest import FakeContextService

DOC = "The pass key is 48213. Remember it."


def samples(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


# --- request ids ---------------------------------------------------------------------------------


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    first = client.get("/healthz").headers["x-request-id"]
    second = client.get("/nowhere").headers["x-request-id"]

    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second


def test_a_sane_client_request_id_is_echoed(client: TestClient) -> None:
    response = client.get("/healthz", headers={"X-Request-Id": "trace-42.a_b:c"})

    assert response.headers["x-request-id"] == "trace-42.a_b:c"


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "new\\nline"])
def test_an_odd_client_request_id_is_replaced(client: TestClient, given: str) -> None:
    response = client.get("/healthz", headers={"X-Request-Id": given})

    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_access_log_names_the_request(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "kvzip.access"):
        response = client.get("/contexts/ctx_" + "0" * 32, headers={"X-Request-Id": "req-7"})

    record = next(r for r in caplog.records if r.name == "kvzip.access")
    assert response.status_code == 404
    assert record.getMessage().startswith("GET /contexts/ctx_")
    assert (record.status, record.route) == (404, "/contexts/{context_id}")  # type: ignore[attr-defined]
    assert RequestIdFilter().filter(record) is True


def test_json_formatter_writes_one_object_with_the_request_id() -> None:
    record = logging.makeLogRecord(
        {"name": "kvzip.access", "levelname": "INFO", "msg": "GET %s", "args": ("/x",)}
    )
    record.status = 200
    token = request_id.set("req-123")
    try:
        RequestIdFilter().filter(record)
        line = JsonFormatter().format(record)
    finally:
        request_id.reset(token)

    entry = json.loads(line)
    assert entry["message"] == "GET /x" and entry["request_id"] == "req-123"
    assert (entry["level"], entry["logger"], entry["status"]) == ("info", "kvzip.access", 200)
    assert entry["time"].endswith("+00:00")


def test_configure_logging_json_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    from app.logs import configure_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("info", "json")
        logging.getLogger("kvzip.test").info("hello %s", "world", extra={"route": "/r"})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)

    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (entry["message"], entry["route"], entry["request_id"]) == ("hello world", "/r", "-")


# --- metrics -------------------------------------------------------------------------------------


def test_requests_are_counted_by_route_template_and_status(client: TestClient) -> None:
    route = "/contexts/{context_id}"
    before = samples(client)
    client.get("/contexts/ctx_" + "0" * 32)
    client.get("/contexts/ctx_" + "1" * 32)
    after = samples(client)

    key = dict(method="GET", route=route, status="404")
    assert (
        value(after, "kvzip_http_requests_total", **key)
        - value(before, "kvzip_http_requests_total", **key)
        == 2
    )
    assert value(after, "kvzip_http_request_duration_seconds_count", **key) >= 2


def test_metrics_never_name_a_context(client: TestClient) -> None:
    context_id = client.post("/contexts", json={"text": DOC}).json()["id"]
    client.post(f"/contexts/{context_id}/query", json={"question": "Key?"})
    client.post(f"/contexts/{context_id}/query", json={"question": "Key?", "stream": True})
    client.get("/nowhere/ctx_" + "2" * 32)

    text = client.get("/metrics").text

    assert "ctx_" not in text
    assert 'route="unmatched"' in text
    assert all(
        line.startswith(("#", "kvzip_", "python_", "process_"))
        for line in text.splitlines()
        if line
    )


def test_answers_feed_ttft_and_inter_token_latency(
    client: TestClient, fake: FakeContextService
) -> None:
    context_id = client.post("/contexts", json={"text": DOC}).json()["id"]
    before = samples(client)
    client.post(f"/contexts/{context_id}/query", json={"question": "Key?"})
    with client.stream(
        "POST", f"/contexts/{context_id}/query", json={"question": "Key?", "stream": True}
    ) as response:
        list(response.iter_lines())
    after = samples(client)

    ttft = "kvzip_time_to_first_token_seconds_count"
    itl = "kvzip_inter_token_latency_seconds_count"
    assert value(after, ttft) - value(before, ttft) == 2
    assert value(after, itl) - value(before, itl) == 1 + 4  # one mean, then 4 streamed gaps
    assert value(after, "kvzip_time_to_first_token_seconds_sum") - value(
        before, "kvzip_time_to_first_token_seconds_sum"
    ) == pytest.approx(0.04)


# --- the worker's metrics endpoint (`kvzip worker`) ---------------------------------------------


@pytest.fixture
def worker_cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """`kvzip worker` with the worker itself replaced: `run_worker` records whether the metrics
    endpoint answered while it ran; every server started is shut down afterwards."""
    import importlib
    import types

    import prometheus_client

    import app.logs
    import service.telemetry  # noqa: F401  (the engine series a real worker registers)

    for name in list(os.environ):
        if name.startswith("KVZIP_"):
            monkeypatch.delenv(name)
    seen: dict[str, Any] = {"servers": [], "ran": False}
    real_start = prometheus_client.start_http_server

    def start(port: int, addr: str = "0.0.0.0") -> Any:
        server, thread = real_start(port, addr=addr)
        seen["servers"].append(server)
        return server, thread

    def run_worker(config: object) -> None:
        seen["ran"] = True
        port = os.environ.get("KVZIP_WORKER_METRICS_PORT", "9410")
        if port != "0":
            seen["body"] = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    stub = types.SimpleNamespace(run_worker=run_worker)
    real_import = importlib.import_module
    monkeypatch.setattr(
        importlib,
        "import_module",
        lambda name, *a: stub if name.endswith("worker_main") else real_import(name, *a),
    )
    monkeypatch.setattr(prometheus_client, "start_http_server", start)
    monkeypatch.setattr(app.logs, "configure_logging", lambda *a: None)
    yield seen
    for server in seen["servers"]:
        server.shutdown()
        server.server_close()


def test_a_worker_serves_the_engine_series_on_its_metrics_port(
    worker_cli: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVZIP_WORKER_METRICS_PORT", str(free_port()))

    assert kvzip(["worker"], out=io.StringIO(), err=io.StringIO()) == 0

    assert worker_cli["ran"] and len(worker_cli["servers"]) == 1
    assert worker_cli["servers"][0].server_address[0] == "127.0.0.1"  # the default: loopback
    assert "# TYPE kvzip_decode_step_seconds histogram" in worker_cli["body"]


def test_metrics_port_zero_serves_nothing(
    worker_cli: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVZIP_WORKER_METRICS_PORT", "0")

    assert kvzip(["worker"], out=io.StringIO(), err=io.StringIO()) == 0

    assert worker_cli["ran"] and worker_cli["servers"] == []


def test_a_taken_metrics_port_refuses_to_start_the_worker(
    worker_cli: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("KVZIP_WORKER_METRICS_PORT", str(port))
        err = io.StringIO()

        assert kvzip(["worker"], out=io.StringIO(), err=err) == 2

    assert not worker_cli["ran"]  # before the model would load
    assert f"127.0.0.1:{port}" in err.getvalue() and "KVZIP_WORKER_METRICS_PORT" in err.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
