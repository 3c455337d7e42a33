"""Issue 13, the HTTP side: secure by default, every bad input a 4xx with the error envelope,
bounded metrics labels and rate buckets, throttled key guessing."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

import app.__main__
from app import cli
from app.errors import handle_validation_error
from app.main import create_app
from app.ratelimit import AUTH_FAILURE_BURST, LocalRateLimiter
from app.schemas import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES
from app.settings import ExposureError, Settings
from service.errors import InvalidInputError
from service.serving.records import ContextRecord, decode_page_token, encode_page_token

if TYPE_CHECKING:
    from tests.app.conftest import FakeContextService

DOC = "The pass key is 48213. Remember it."
KEY = "sk-team-a-key-0001"
CID = "ctx_" + "ab" * 16


def assert_error(response: Any, status: int, code: str, message: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert message in error["message"], error["message"]
    return error


def register(client: TestClient) -> str:
    response = client.post("/contexts", json={"text": DOC})
    assert response.status_code == 201, response.text
    context_id: str = response.json()["id"]
    return context_id


def chat(context_id: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "What is the pass key?"}]
    return {"model": "fake-model", "context_id": context_id, "messages": messages, **extra}


# --- item 1: secure by default -------------------------------------------------------------------


@pytest.fixture
def uvicorn_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """uvicorn.run replaced by a recorder: serve() returns at once instead of serving."""
    runs: list[dict[str, Any]] = []
    monkeypatch.setattr(app.__main__.uvicorn, "run", lambda _app, **kw: runs.append(kw))
    return runs


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "kvzip.example.com"])
def test_serve_refuses_an_open_api_on_a_non_loopback_address(
    host: str, uvicorn_runs: list[dict[str, Any]]
) -> None:
    with pytest.raises(ExposureError, match="refusing to serve without API keys") as caught:
        app.__main__.serve(Settings(host=host))

    assert "KVZIP_ALLOW_ANONYMOUS=true" in str(caught.value)
    assert "KVZIP_API_KEYS" in str(caught.value)
    assert uvicorn_runs == []


@pytest.mark.parametrize(
    "settings",
    [
        Settings(host="127.0.0.1"),
        Settings(host="localhost"),
        Settings(host="::1"),
        Settings(host="0.0.0.0", api_keys={KEY: "team-a"}),
        Settings(host="0.0.0.0", admin_api_key=KEY),
        Settings(host="0.0.0.0", allow_anonymous=True),
    ],
    ids=["loopback", "localhost", "ipv6-loopback", "keys", "admin-key", "allowed-anonymous"],
)
def test_serve_starts_on_loopback_with_keys_or_when_anonymous_is_allowed(
    settings: Settings, uvicorn_runs: list[dict[str, Any]]
) -> None:
    app.__main__.serve(settings)

    assert [run["host"] for run in uvicorn_runs] == [settings.host]


def test_allow_anonymous_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVZIP_HOST", "0.0.0.0")
    with pytest.raises(ExposureError):
        Settings().check_exposure()
    monkeypatch.setenv("KVZIP_ALLOW_ANONYMOUS", "true")
    Settings().check_exposure()


def test_python_m_app_and_kvzip_serve_exit_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, uvicorn_runs: list[dict[str, Any]]
) -> None:
    monkeypatch.setenv("KVZIP_HOST", "0.0.0.0")
    with pytest.raises(SystemExit, match="refusing to serve without API keys"):
        app.__main__.main()
    err = io.StringIO()

    status = cli.main(["serve", "--host", "0.0.0.0"], out=io.StringIO(), err=err)

    assert status == 2 and "refusing to serve without API keys on 0.0.0.0" in err.getvalue()
    assert uvicorn_runs == []


def test_compose_and_env_example_ship_a_key_to_set() -> None:
    """The compose api runs on 0.0.0.0 (so it refuses to start without a key) and passes
    KVZIP_ALLOW_ANONYMOUS through; .env.example has the key line to fill in, uncommented."""
    root = Path(__file__).resolve().parents[2]
    compose = (root / "docker-compose.yml").read_text()
    assert "KVZIP_ALLOW_ANONYMOUS: ${KVZIP_ALLOW_ANONYMOUS:-}" in compose
    assert "KVZIP_HOST=0.0.0.0" in (root / "docker/Dockerfile.api").read_text()
    example = (root / ".env.example").read_text().splitlines()
    assert "KVZIP_API_KEYS=" in example
    assert "# KVZIP_ALLOW_ANONYMOUS=false" in example
    assert "KVZIP_ALLOW_ANONYMOUS=true" in (root / "docs/deploy.md").read_text()


# --- item 2: the stop list of the OpenAI route ---------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (["x"] * (MAX_STOP_SEQUENCES + 1), "List should have at most 4 items"),
        (["x"] * 10_000, "List should have at most 4 items"),
        (["y" * (MAX_STOP_LENGTH + 1)], "String should have at most 256 characters"),
        ("y" * (MAX_STOP_LENGTH + 1), "String should have at most 256 characters"),
        ([""], "String should have at least 1 character"),
    ],
    ids=["five", "ten-thousand", "long-in-list", "long-string", "empty"],
)
def test_chat_completions_caps_stop_like_the_native_route(
    client: TestClient, fake: FakeContextService, stop: Any, message: str
) -> None:
    context_id = register(client)

    openai = client.post("/v1/chat/completions", json=chat(context_id, stop=stop))
    native = client.post(f"/contexts/{context_id}/query", json={"question": "q", "stop": stop})

    assert_error(openai, 422, "invalid_request", message)
    if isinstance(stop, list):
        assert_error(native, 422, "invalid_request", message)
    assert fake.queries == []


def test_chat_completions_takes_up_to_four_stop_strings(
    client: TestClient, fake: FakeContextService
) -> None:
    context_id = register(client)
    stop = ["a", "b", "c", "d" * MAX_STOP_LENGTH]

    response = client.post("/v1/chat/completions", json=chat(context_id, stop=stop))

    assert response.status_code == 200, response.text
    assert fake.queries[-1][1].sampling.stop == tuple(stop)


def test_both_routes_share_one_stop_schema(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    native = schemas["QueryCreate"]["properties"]["stop"]["anyOf"][0]
    openai = schemas["ChatCompletionCreate"]["properties"]["stop"]["anyOf"]
    assert native["maxItems"] == MAX_STOP_SEQUENCES == 4
    assert native["items"]["maxLength"] == MAX_STOP_LENGTH
    assert native in openai


# --- item 3: non-finite numbers ------------------------------------------------------------------

NON_FINITE = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity"]

NATIVE_FIELDS = {
    "create": ("/contexts", {"text": DOC}, ["ttl_seconds"]),
    "create.compression": ("/contexts", {"text": DOC}, ["compression.ratio"]),
    "create.threshold": ("/contexts", {"text": DOC}, ["compression.threshold"]),
    "query": (
        "/contexts/{id}/query",
        {"question": "q"},
        ["max_new_tokens", "temperature", "ratio", "top_p", "seed"],
    ),
    "update": ("/contexts/{id}", {}, ["ttl_seconds"]),
    "chat": (
        "/v1/chat/completions",
        chat("{id}"),
        ["max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n"],
    ),
}


def numeric_cases() -> Iterator[Any]:
    for name, (path, body, fields) in NATIVE_FIELDS.items():
        for field in fields:
            for number in NON_FINITE:
                yield pytest.param(path, body, field, number, id=f"{name}-{field}-{number}")


def raw_body(body: dict[str, Any], field: str, number: str, context_id: str) -> bytes:
    """`body` with `field` (dotted: compression.ratio) set to the bare JSON token `number`."""
    marker = "__NUMBER__"
    filled = json.loads(json.dumps(body).replace("{id}", context_id))
    target = filled
    *parents, leaf = field.split(".")
    for parent in parents:
        target = target.setdefault(parent, {})
    target[leaf] = marker
    return json.dumps(filled).replace(f'"{marker}"', number).encode()


@pytest.mark.parametrize(("path", "body", "field", "number"), numeric_cases())
def test_non_finite_numbers_are_422_with_the_envelope(
    client: TestClient,
    fake: FakeContextService,
    path: str,
    body: dict[str, Any],
    field: str,
    number: str,
) -> None:
    context_id = register(client)
    calls = len(fake.calls)
    method = "PATCH" if path == "/contexts/{id}" else "POST"

    response = client.request(
        method,
        path.replace("{id}", context_id),
        content=raw_body(body, field, number, context_id),
        headers={"Content-Type": "application/json"},
    )

    error = assert_error(response, 422, "invalid_request", field)
    assert field.split(".")[-1] in error["detail"][0]["loc"]
    assert fake.calls[calls:] == []  # refused before the service


async def test_the_422_handler_serialises_any_input_and_context() -> None:
    """A validation error whose input and ctx hold non-finite floats, bytes and arbitrary
    objects still gives a JSON 422 (json.dumps refuses inf and NaN)."""
    request = Request({"type": "http", "method": "POST", "path": "/x", "headers": []})
    error = {
        "type": "value_error",
        "loc": ("body", "x"),
        "msg": "bad",
        "input": [float("inf"), float("nan"), b"\xff", object(), {"k": -float("inf")}],
        "ctx": {"error": ValueError("boom"), "le": float("inf")},
    }

    response = await handle_validation_error(request, RequestValidationError([error]))

    body = json.loads(response.body)
    detail = body["error"]["detail"][0]
    assert detail["input"][:2] == ["inf", "nan"]
    assert detail["input"][4] == {"k": "-inf"}
    assert detail["ctx"] == {"error": "boom", "le": "inf"}
    assert detail["loc"] == ["body", "x"]


def test_a_huge_422_echo_is_cut_short(client: TestClient) -> None:
    response = client.post("/contexts", json={"text": DOC, "display_name": "n" * 100_000})

    error = assert_error(response, 422, "invalid_request", "display_name")
    assert len(response.content) < 4096
    assert error["detail"][0]["input"].endswith("...")


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "a", "display_name": "\\ud800"}',
        b'{"text": "a", "\\udfff": 1}',
        b'{"text": "a", "compression": {"method": "\\ud800"}}',
    ],
    ids=["value", "unknown-field-name", "nested"],
)
def test_a_lone_surrogate_echoed_in_a_422_is_escaped_not_500(
    client: TestClient, body: bytes
) -> None:
    response = client.post("/contexts", content=body, headers={"Content-Type": "application/json"})

    error = assert_error(response, 422, "invalid_request", "")
    assert "\\ud800" in response.text or "\\udfff" in response.text, error


def test_a_huge_unknown_field_name_is_not_echoed_whole(client: TestClient) -> None:
    response = client.post("/contexts", json={"text": DOC, "k" * 100_000: 1})

    assert_error(response, 422, "invalid_request", "Extra inputs are not permitted")
    assert len(response.content) < 4096


# --- item 4: page_token --------------------------------------------------------------------------


def token_of(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode()


BAD_TOKENS = {
    "huge-int": f'[{"9" * 330}, "{CID}"]',
    "overflowing-float": f'[1e400, "{CID}"]',
    "nan": '[NaN, "a"]',
    "nan-good-id": f'[NaN, "{CID}"]',
    "infinity": f'[Infinity, "{CID}"]',
    "negative": f'[-1, "{CID}"]',
    "after-year-9999": f'[1e12, "{CID}"]',
    "bool": f'[true, "{CID}"]',
    "string-stamp": f'["1", "{CID}"]',
    "not-an-id": '[1741964966.0, "a"]',
    "uppercase-id": f'[1741964966.0, "{CID.upper()}"]',
    "id-not-a-string": "[1741964966.0, 7]",
    "three-items": f'[1, "{CID}", 3]',
    "object": "{}",
    "nested": "[" * 200 + "]" * 200,
}


@pytest.mark.parametrize("raw", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_decode_page_token_accepts_only_finite_in_range_stamps_and_context_ids(
    raw: str,
) -> None:
    with pytest.raises(InvalidInputError, match="page_token is not a token this service issued"):
        decode_page_token(token_of(raw))


def test_decode_page_token_reads_what_encode_page_token_wrote() -> None:
    position = (datetime(2025, 3, 14, tzinfo=UTC).timestamp() + 0.25, CID)
    assert decode_page_token(encode_page_token(position)) == position
    assert decode_page_token(token_of(f'[1741964966, "{CID}"]')) == (1741964966.0, CID)


@pytest.mark.parametrize("name", ["huge-int", "overflowing-float", "nan", "bool"])
def test_a_bad_page_token_is_400_not_500(client: TestClient, name: str) -> None:
    response = client.get("/contexts", params={"page_token": token_of(BAD_TOKENS[name])})

    assert_error(response, 400, "invalid_input", "page_token is not a token this service issued")


# --- item 10: the method label -------------------------------------------------------------------


def test_unknown_methods_share_one_metrics_label(client: TestClient) -> None:
    for index in range(3):
        response = client.request(f"ZZPROBE{index}", "/contexts")
        assert response.status_code in (404, 405), response.text
    client.request("PATCH", "/healthz")

    text = client.get("/metrics").text

    assert "ZZPROBE" not in text
    assert 'kvzip_http_requests_total{method="other",route="unmatched"' in text or (
        'kvzip_http_requests_total{method="other",route="/contexts"' in text
    )
    assert 'method="PATCH"' in text


# --- item 13: throttled 401s, bounded buckets ----------------------------------------------------


@pytest.fixture
def keyed(fake: FakeContextService) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(api_keys={KEY: "team-a"}), fake)) as client:
        yield client


@pytest.mark.parametrize("header", [{}, {"Authorization": "Bearer sk-wrong-key-0000"}])
def test_401s_are_throttled_per_client_address(
    keyed: TestClient, fake: FakeContextService, header: dict[str, str]
) -> None:
    """After AUTH_FAILURE_BURST 401s the address gets 429, even for the right key (its keys
    are not checked), although the configured rate limit is off."""
    for _ in range(AUTH_FAILURE_BURST):
        assert_error(keyed.get("/contexts", headers=header), 401, "unauthorized", "")

    guessed = keyed.get("/contexts", headers=header)
    right = keyed.get("/contexts", headers={"Authorization": f"Bearer {KEY}"})

    error = assert_error(guessed, 429, "too_many_requests", "without a valid API key")
    assert "retry in" in error["message"] and int(guessed.headers["Retry-After"]) >= 1
    assert_error(right, 429, "too_many_requests", "without a valid API key")
    assert "list_contexts" not in fake.calls


def test_valid_keys_do_not_use_up_the_401_budget(keyed: TestClient) -> None:
    for _ in range(AUTH_FAILURE_BURST * 3):
        response = keyed.get("/contexts", headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200, response.text


async def test_401_throttle_refills_over_time() -> None:
    limiter = LocalRateLimiter(per_minute=30, burst=2)
    assert await limiter.acquire("addr-x", now=0.0) == 0.0
    assert await limiter.acquire("addr-x", now=0.0) == 0.0
    assert await limiter.wait("addr-x", now=0.0) == pytest.approx(2.0)
    assert await limiter.wait("addr-x", now=2.0) == 0.0
    assert await limiter.wait("addr-y", now=0.0) == 0.0  # peeking takes nothing
    assert len(limiter) == 1


async def test_rate_buckets_are_bounded_least_recently_used_first() -> None:
    limiter = LocalRateLimiter(per_minute=60, burst=1, max_buckets=3)
    for index in range(1000):
        await limiter.acquire(f"addr-{index}", now=0.0)
    assert len(limiter) == 3
    await limiter.acquire("addr-997", now=0.0)  # used again: now the most recent
    await limiter.acquire("addr-new", now=0.0)
    assert await limiter.acquire("addr-997", now=0.0) > 0  # kept, still empty
    assert await limiter.acquire("addr-998", now=0.0) == 0.0  # evicted: a fresh bucket


def test_open_mode_buckets_stay_bounded(fake: FakeContextService) -> None:
    """One bucket per client address in open mode, at most max_buckets of them."""
    application = create_app(Settings(rate_limit_per_minute=60, rate_limit_burst=5), fake)
    application.state.rate_limiter = LocalRateLimiter(60, 5, max_buckets=4)
    for index in range(20):
        with TestClient(application, client=(f"10.0.0.{index}", 5000)) as client:
            assert client.get("/contexts").status_code == 200
    limiter: LocalRateLimiter = application.state.rate_limiter
    assert len(limiter) == 4


# --- item 11: one corrupt record -----------------------------------------------------------------


def _record(context_id: str, tenant: str, **changes: Any) -> ContextRecord:
    fields: dict[str, Any] = {
        "id": context_id,
        "tenant": tenant,
        "display_name": None,
        "model": "m",
        "state": "READY",
        "create_time": datetime(2025, 3, 14, tzinfo=UTC).isoformat(),
        "context_tokens": 10,
        "prefix_tokens": 2,
        "method": "kvzip",
        "ratio": 0.3,
        "chunk_size": 2000,
        "kept_kv_pairs": 3,
        "total_kv_pairs": 10,
        "bytes": 100,
    }
    return ContextRecord(**(fields | changes))


async def test_one_corrupt_record_does_not_break_listing(tmp_path: Path) -> None:
    """`{}`, JSON that is not an object and a record with a bad timestamp on disk: every
    tenant's listing still answers, with its good contexts (issue 13, item 11)."""
    from service.config import ServiceConfig
    from service.serving.embedded import build_embedded_service
    from service.serving.records import record_key

    service = build_embedded_service(ServiceConfig(data_dir=tmp_path))
    good = _record("ctx_" + "1" * 32, "team-a")
    await service.store.put(record_key(good.id), good.to_json())
    await service.store.put(record_key("ctx_" + "2" * 32), b"{}")
    await service.store.put(record_key("ctx_" + "3" * 32), b"[1, 2]")
    bad_time = _record("ctx_" + "4" * 32, "team-a", create_time="not a time")
    await service.store.put(record_key(bad_time.id), bad_time.to_json())

    page = await service.list_contexts("team-a")
    other = await service.list_contexts("team-b")

    assert [info.id for info in page.contexts] == [good.id]
    assert other.contexts == []
