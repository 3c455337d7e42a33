"""Request ids, structured logs, and the Prometheus exposition."""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

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
