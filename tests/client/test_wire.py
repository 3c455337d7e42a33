"""What the live app does not readily produce, over `httpx.MockTransport`: a FAILED ingest,
a not-ready server, errors that are not the envelope, a stream cut short or ended by an
error event, Retry-After as a date, and the retry policy's choices."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvzip.client import (
    APIConnectionError,
    APIError,
    AsyncClient,
    Client,
    ConflictError,
    ContextFailedError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    RequestTooLargeError,
    ServerError,
    UnauthorizedError,
)
from kvzip.client.errors import error_from_response
from kvzip.client.plans import RetryPolicy

ROOT = Path(__file__).resolve().parents[2]
CONTEXT_ID = "ctx_" + "1" * 32
CONTEXT: dict[str, Any] = {
    "id": CONTEXT_ID,
    "model": "tiny",
    "state": "PROCESSING",
    "create_time": "2025-03-14T15:09:26Z",
    "progress": 0.25,
    "usage": {"context_tokens": 12},
    "compression": {
        "method": "kvzip",
        "ratio": 0.3,
        "kept_kv_pairs": 3,
        "total_kv_pairs": 12,
        "kept_fraction": 0.25,
        "bytes": 96,
    },
    "a_field_from_a_newer_server": True,
}


def mock(handler: Callable[[httpx.Request], httpx.Response]) -> Client:
    return Client("http://kvzip.test", "sk-k", transport=httpx.MockTransport(handler))


def sse(*events: Any) -> httpx.Response:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return httpx.Response(200, text="".join(lines), headers={"x-request-id": "req-7"})


def test_a_failed_ingest_raises_with_its_record() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={**CONTEXT, "state": "FAILED", "error": "out of memory"})

    with mock(handler) as client, pytest.raises(ContextFailedError) as failed:
        client.wait_until_ready(CONTEXT_ID, poll_interval=0)

    assert failed.value.context.error == "out of memory"
    assert "out of memory" in str(failed.value)
    assert seen[0].headers["authorization"] == "Bearer sk-k"
    assert seen[0].url.path == f"/contexts/{CONTEXT_ID}"


def test_not_ready_is_false_and_other_errors_raise() -> None:
    statuses = iter([503, 500])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(statuses), json={"status": "not_ready"})

    with mock(handler) as client:
        assert client.ready() is False
        with pytest.raises(ServerError):
            client.ready()


def test_a_body_that_is_not_the_envelope_keeps_its_text() -> None:
    response = httpx.Response(502, text="<html>Bad Gateway</html>")
    error = error_from_response(response)

    assert isinstance(error, ServerError) and error.status == 502
    assert (error.code, error.message) == ("bad_gateway", "<html>Bad Gateway</html>")


def test_retry_after_may_be_a_date() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    response = httpx.Response(
        429, json={"error": {"code": "too_many_requests", "message": "slow down"}},
        headers={"Retry-After": later},
    )  # fmt: skip
    error = error_from_response(response)

    assert isinstance(error, RateLimitedError)
    assert error.retry_after is not None and 25 <= error.retry_after <= 30


def test_the_retry_policy() -> None:
    policy = RetryPolicy(max_retries=2, max_wait=10.0, backoff=0.5)
    full = OverloadedError("queue full", status=503, retry_after=3.0)
    down = OverloadedError("no engine", status=503)

    assert policy.delay(full, 0) == 3.0
    assert policy.delay(down, 1) == 1.0  # no Retry-After: backoff * 2**attempt
    assert policy.delay(full, 2) is None  # retries spent
    assert policy.delay(OverloadedError("", retry_after=60.0), 0) is None  # too long a wait
    assert policy.delay(APIError("", status=404), 0) is None
    assert RetryPolicy().delay(full, 0) is None  # off by default


def test_a_stream_cut_short_or_failing_raises() -> None:
    bodies = iter(
        [
            sse({"delta": "The"}),  # no final event, no [DONE]
            sse({"delta": "The"}, {"error": {"code": "queue_full", "message": "busy"}}),
            sse({"delta": "x"}, "[DONE]"),  # [DONE] without the answer
        ]
    )
    with mock(lambda request: next(bodies)) as client:
        with pytest.raises(APIConnectionError) as cut:
            list(client.stream_query(CONTEXT_ID, "Q?"))
        assert cut.value.code == "incomplete_stream"
        with pytest.raises(OverloadedError) as failed:
            list(client.stream_query(CONTEXT_ID, "Q?"))
        assert (failed.value.status, failed.value.request_id) == (None, "req-7")
        stream = client.stream_query(CONTEXT_ID, "Q?")
        assert list(stream) == ["x"]
        with pytest.raises(APIError, match="without its final event"):
            _ = stream.result


async def test_the_async_client_drives_the_same_plans() -> None:
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        progress = min(1.0, 0.25 * len(calls))
        state = "READY" if progress == 1.0 else "PROCESSING"
        return httpx.Response(200, json={**CONTEXT, "state": state, "progress": progress})

    transport = httpx.MockTransport(handler)
    async with AsyncClient("http://kvzip.test", transport=transport) as client:
        ready = await client.wait_until_ready(CONTEXT_ID, poll_interval=0)

    assert ready.state == "READY" and ready.progress == 1.0 and len(calls) == 4


def test_the_client_imports_no_server_code() -> None:
    server = ("torch", "fastapi", "app", "service", "storage")
    program = (
        "import sys, kvzip.client\n"
        f"loaded = [m for m in {server!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, InvalidRequestError),
        (401, UnauthorizedError),
        (404, NotFoundError),
        (405, APIError),
        (409, ConflictError),
        (413, RequestTooLargeError),
        (422, InvalidRequestError),
        (429, RateLimitedError),
        (500, ServerError),
        (503, OverloadedError),
    ],
)
def test_each_status_has_its_class(status: int, kind: type[APIError]) -> None:
    body = {"error": {"code": "some_code", "message": "refused"}}
    response = httpx.Response(status, json=body, headers={"x-request-id": "req-1"})
    error = error_from_response(response)

    assert type(error) is kind
    assert (error.status, error.code, error.message, error.request_id) == (
        status, "some_code", "refused", "req-1"
    )  # fmt: skip
