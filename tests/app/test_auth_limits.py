"""API keys and tenants, the admin key, the open default, and the limits (413, 429, 503)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.ratelimit import LocalRateLimiter
from app.settings import Settings

if TYPE_CHECKING:
    from tests.app.conftest import FakeContextService

DOC = "The pass key is 48213. Remember it."
KEY_A, KEY_B, ADMIN = "sk-team-a-key-0001", "sk-team-b-key-0002", "sk-admin-key-0003"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response: Any, status: int, code: str, message: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert (error["code"], message in error["message"]) == (code, True), error
    return error


@pytest.fixture
def keyed(fake: FakeContextService) -> Iterator[TestClient]:
    settings = Settings(api_keys={KEY_A: "team-a", KEY_B: "team-b"}, admin_api_key=ADMIN)
    with TestClient(create_app(settings, fake)) as client:
        yield client


# --- keys and tenants ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/contexts"),
        ("POST", "/contexts"),
        ("GET", "/contexts/ctx_" + "0" * 32),
        ("POST", "/contexts/ctx_" + "0" * 32 + "/query"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
    ],
)
def test_without_a_key_every_use_case_is_401(
    keyed: TestClient, fake: FakeContextService, method: str, path: str
) -> None:
    response = keyed.request(method, path, json={"text": DOC})

    assert_error(response, 401, "unauthorized", "an API key is required")
    assert response.headers["www-authenticate"] == "Bearer"
    assert fake.calls == []


def test_an_unknown_key_is_401(keyed: TestClient) -> None:
    response = keyed.get("/contexts", headers=bearer("sk-not-a-known-key"))

    assert_error(response, 401, "unauthorized", "invalid API key")


def test_health_and_metrics_need_no_key(keyed: TestClient) -> None:
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_each_key_is_its_tenant(keyed: TestClient, fake: FakeContextService) -> None:
    a = keyed.post("/contexts", json={"text": DOC}, headers=bearer(KEY_A))
    b = keyed.post("/contexts", json={"text": DOC}, headers=bearer(KEY_B))

    assert (a.status_code, b.status_code) == (201, 201)  # no cross-tenant cache hit
    assert a.json()["id"] != b.json()["id"]
    assert [r.tenant for r in fake.created_requests] == ["team-a", "team-b"]


def test_another_tenants_context_is_404(keyed: TestClient, fake: FakeContextService) -> None:
    context_id = keyed.post("/contexts", json={"text": DOC}, headers=bearer(KEY_A)).json()["id"]
    url = f"/contexts/{context_id}"

    assert keyed.get(url, headers=bearer(KEY_A)).status_code == 200
    assert_error(keyed.get(url, headers=bearer(KEY_B)), 404, "context_not_found", context_id)
    query = keyed.post(f"{url}/query", json={"question": "Key?"}, headers=bearer(KEY_B))
    assert_error(query, 404, "context_not_found", context_id)
    patch = keyed.patch(url, json={"ttl_seconds": 60}, headers=bearer(KEY_B))
    assert_error(patch, 404, "context_not_found", context_id)
    assert_error(keyed.delete(url, headers=bearer(KEY_B)), 404, "context_not_found", context_id)
    assert keyed.get("/contexts", headers=bearer(KEY_B)).json()["contexts"] == []
    assert [c["id"] for c in keyed.get("/contexts", headers=bearer(KEY_A)).json()["contexts"]] == [
        context_id
    ]


def test_the_admin_key_sees_every_tenant(keyed: TestClient, fake: FakeContextService) -> None:
    a = keyed.post("/contexts", json={"text": DOC}, headers=bearer(KEY_A)).json()["id"]
    b = keyed.post("/contexts", json={"text": DOC + "!"}, headers=bearer(KEY_B)).json()["id"]

    listed = keyed.get("/contexts", headers=bearer(ADMIN)).json()["contexts"]
    assert {c["id"] for c in listed} == {a, b}
    assert fake.listings[-1][0] == "*"
    assert keyed.get(f"/contexts/{a}", headers=bearer(ADMIN)).status_code == 200
    assert keyed.delete(f"/contexts/{b}", headers=bearer(ADMIN)).status_code == 204
    created = keyed.post("/contexts", json={"text": "admin doc"}, headers=bearer(ADMIN))
    assert created.status_code == 201 and fake.created_requests[-1].tenant == ""


def test_open_mode_is_said_at_startup(
    fake: FakeContextService, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "app.auth"), TestClient(create_app(Settings(), fake)):
        pass

    assert "no API key configured" in caplog.text and "local use only" in caplog.text


def test_keyed_mode_is_said_at_startup(
    fake: FakeContextService, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(api_keys={KEY_A: "team-a"})
    with caplog.at_level(logging.INFO, "app.auth"), TestClient(create_app(settings, fake)):
        pass

    assert "API keys required: 1 tenant(s) ['team-a'], no admin key" in caplog.text
    assert KEY_A not in caplog.text


def test_public_host_without_keys_warns_harder(
    fake: FakeContextService, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(host="0.0.0.0")
    with caplog.at_level(logging.WARNING, "app.auth"), TestClient(create_app(settings, fake)):
        pass

    assert "this address is not local" in caplog.text


# --- limits ------------------------------------------------------------------------------------


def test_body_over_the_limit_is_413_by_content_length(fake: FakeContextService) -> None:
    settings = Settings(max_body_bytes=1000)  # type: ignore[arg-type]
    with TestClient(create_app(settings, fake)) as client:
        response = client.post("/contexts", json={"text": "x" * 2000})
        small = client.post("/contexts", json={"text": DOC})

    error = assert_error(response, 413, "request_too_large", "the limit is 1000 bytes")
    assert "request body is 2011 bytes" in error["message"]
    assert response.headers["x-request-id"]
    assert small.status_code == 201
    assert fake.created_requests[-1].text == DOC


def test_chunked_body_over_the_limit_is_413(fake: FakeContextService) -> None:
    settings = Settings(max_body_bytes=1000)  # type: ignore[arg-type]

    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 200
        yield b'"}'

    with TestClient(create_app(settings, fake)) as client:
        response = client.post(
            "/contexts", content=chunks(), headers={"content-type": "application/json"}
        )

    assert_error(response, 413, "request_too_large", "more than 1000")
    assert fake.created_requests == []


def test_rate_over_the_limit_is_429_with_retry_after(fake: FakeContextService) -> None:
    settings = Settings(
        api_keys={KEY_A: "team-a", KEY_B: "team-b"}, rate_limit_per_minute=6, rate_limit_burst=2
    )
    with TestClient(create_app(settings, fake)) as client:
        first = [client.get("/contexts", headers=bearer(KEY_A)).status_code for _ in range(2)]
        limited = client.get("/contexts", headers=bearer(KEY_A))
        other_key = client.get("/contexts", headers=bearer(KEY_B))

    assert first == [200, 200]
    assert_error(limited, 429, "too_many_requests", "rate limit of 6 requests per minute")
    assert limited.headers["retry-after"] == "10"
    assert other_key.status_code == 200  # buckets are per key


async def test_rate_limiter_refills_over_time() -> None:
    limiter = LocalRateLimiter(per_minute=60, burst=1)

    assert await limiter.acquire("k", now=0.0) == 0.0
    assert await limiter.acquire("k", now=0.5) == pytest.approx(0.5)
    assert await limiter.acquire("k", now=1.0) == 0.0
    assert await LocalRateLimiter(per_minute=0, burst=1).acquire("k") == 0.0  # off


def test_embedded_mode_limits_in_process(fake: FakeContextService) -> None:
    application = create_app(Settings(rate_limit_per_minute=6), fake)

    assert isinstance(application.state.rate_limiter, LocalRateLimiter)
    assert isinstance(application.state.auth_failures, LocalRateLimiter)


def test_distributed_mode_limits_on_redis_and_a_redis_outage_is_503(
    fake: FakeContextService,
) -> None:
    """Both buckets on Redis; a Redis that cannot be reached waives no limit: 503."""
    from service.serving.distributed.ratelimit import RedisRateLimiter

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the block ends
    settings = Settings(
        mode="distributed",
        redis_url=f"redis://127.0.0.1:{port}/0",
        api_keys={KEY_A: "team-a"},
        rate_limit_per_minute=60,
    )
    application = create_app(settings, fake)
    assert isinstance(application.state.rate_limiter, RedisRateLimiter)
    assert isinstance(application.state.auth_failures, RedisRateLimiter)

    with TestClient(application) as client:
        keyed = client.get("/contexts", headers=bearer(KEY_A))
        keyless = client.get("/contexts")

    assert_error(keyed, 503, "engine_unavailable", "rate limit cannot be checked")
    assert_error(keyless, 503, "engine_unavailable", "Redis is unreachable")
    assert "list_contexts" not in fake.calls


def test_document_over_the_token_cap_is_413_with_counts(client: TestClient) -> None:
    response = client.post("/contexts", json={"text": "word " * 60})

    error = assert_error(response, 413, "document_too_long", "document is 60 tokens")
    assert "at most 50 context tokens" in error["message"]


def test_full_queue_is_503_with_retry_after_on_every_use_case(
    client: TestClient, fake: FakeContextService
) -> None:
    from service.errors import QueueFullError

    context_id = client.post("/contexts", json={"text": DOC}).json()["id"]
    for method, path, body in [
        ("POST", "/contexts", {"text": DOC + "?"}),
        ("POST", f"/contexts/{context_id}/query", {"question": "Key?"}),
        ("POST", f"/contexts/{context_id}/query", {"question": "Key?", "stream": True}),
    ]:
        fake.fail_with = QueueFullError(retry_after=3.2)
        response = client.request(method, path, json=body)
        assert_error(response, 503, "queue_full", "retry later")
        assert response.headers["retry-after"] == "4"
