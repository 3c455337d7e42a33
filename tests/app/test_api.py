"""HTTP mapping: statuses, fields and error texts, over the in-memory service double."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

import app.main
from app.main import create_app
from app.settings import Settings
from service.errors import (
    ContextLostError,
    ContextNotReadyError,
    CorruptContextError,
    EngineUnavailableError,
    IncompatibleContextError,
    InvalidInputError,
    QueueFullError,
    ServiceError,
    StorageFullError,
    StorageQuotaExceededError,
    TooManyContextsError,
)

if TYPE_CHECKING:
    from tests.app.conftest import FakeContextService

DOC = "The pass key is 48213. Remember it."
UNKNOWN_ID = "ctx_" + "0" * 32


def register(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/contexts", json={"text": DOC, **body})
    assert response.status_code in (200, 201), response.text
    result: dict[str, Any] = response.json()
    return result


def assert_error(response: Any, status: int, code: str, message: str) -> dict[str, Any]:
    """The status, the envelope, the code and (a substring of) the message."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert message in error["message"]
    return error


# --- POST /contexts --------------------------------------------------------------------------


def test_create_is_201_then_200_with_the_same_context(client: TestClient) -> None:
    first = client.post("/contexts", json={"text": DOC, "display_name": "pass key"})
    again = client.post("/contexts", json={"text": DOC, "display_name": "pass key"})

    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json() == first.json()
    assert first.json()["id"].startswith("ctx_")


def test_create_returns_every_resource_field(client: TestClient) -> None:
    body = client.post(
        "/contexts",
        json={"text": DOC, "display_name": "pass key", "compression": {"ratio": 0.5}},
    ).json()

    assert body["name"] == f"contexts/{body['id']}"
    assert body["display_name"] == "pass key"
    assert body["model"] == "fake-model"
    assert body["state"] == "READY"
    assert body["create_time"] == "2025-03-14T15:09:26Z"
    assert body["usage"] == {"context_tokens": 7}
    assert body["compression"] == {
        "method": "kvzip",
        "ratio": 0.5,
        "kept_kv_pairs": 14,
        "total_kv_pairs": 28,
        "kept_fraction": 0.5,
        "bytes": 14 * 256,
        "quantization": "fp8",  # the server's default (KVZIP_DEFAULT_QUANTIZATION)
        "bytes_full_bf16": 28 * 256,
    }


def test_create_passes_text_and_compression_to_the_service(
    client: TestClient, fake: FakeContextService
) -> None:
    register(client, display_name="d", compression={"method": "none", "ratio": 0.7})

    request = fake.created_requests[-1]
    assert request.text == DOC
    assert request.display_name == "d"
    assert (request.compression.method, request.compression.ratio) == ("none", 0.7)
    assert request.compression.chunk_size == 2000


def test_create_without_compression_uses_the_server_defaults(fake: FakeContextService) -> None:
    settings = Settings(default_ratio=0.4, chunk_size=512)
    with TestClient(create_app(settings, fake)) as client:
        register(client)
        register(client, text="other words", compression={"method": "kvzip"})

    defaults, partial = fake.created_requests
    assert (defaults.compression.method, defaults.compression.ratio) == ("kvzip", 0.4)
    assert defaults.compression.chunk_size == 512
    assert defaults.compression.quantization == "fp8"
    assert (partial.compression.method, partial.compression.ratio) == ("kvzip", 0.4)
    assert partial.compression.quantization == "fp8"


@pytest.mark.parametrize("default", ["none", "fp8", "int4"])
def test_quantization_left_out_or_null_is_the_servers_default(
    fake: FakeContextService, default: str
) -> None:
    settings = Settings(default_quantization=default)  # type: ignore[arg-type]
    with TestClient(create_app(settings, fake)) as client:
        register(client)
        register(client, text="other words", compression={"ratio": 0.5})
        register(client, text="third text", compression={"quantization": None})

    assert [r.compression.quantization for r in fake.created_requests] == [default] * 3


@pytest.mark.parametrize("given", ["none", "fp8", "int4"])
def test_an_explicit_quantization_is_kept(fake: FakeContextService, given: str) -> None:
    with TestClient(create_app(Settings(default_quantization="int4"), fake)) as client:
        body = register(client, compression={"quantization": given, "group_size": 32})

    assert fake.created_requests[-1].compression.quantization == given
    assert fake.created_requests[-1].compression.group_size == 32
    assert body["compression"]["quantization"] == given


def test_method_none_reports_the_full_cache(client: TestClient) -> None:
    body = register(client, compression={"method": "none"})

    assert body["compression"]["method"] == "none"
    assert body["compression"]["kept_fraction"] == 1.0


@pytest.mark.parametrize("text", ["", " ", "\n\t  \r\n"])
def test_empty_or_whitespace_text_is_400(
    client: TestClient, fake: FakeContextService, text: str
) -> None:
    response = client.post("/contexts", json={"text": text})

    assert_error(response, 400, "invalid_input", "text is empty or whitespace only")
    assert fake.calls == []


def test_too_long_document_is_413_with_both_token_counts(client: TestClient) -> None:
    response = client.post("/contexts", json={"text": "word " * 60})

    error = assert_error(response, 413, "document_too_long", "document is 60 tokens")
    assert "at most 50 context tokens" in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "text"),
        ({"text": 123}, "text"),
        ({"text": DOC, "display_name": "x" * 513}, "display_name"),
        ({"text": DOC, "compression": {"ratio": 0}}, "compression.ratio"),
        ({"text": DOC, "compression": {"ratio": 1.5}}, "compression.ratio"),
        ({"text": DOC, "compression": {"ratio": -0.1}}, "compression.ratio"),
        ({"text": DOC, "compression": {"method": "foo"}}, "compression.method"),
        ({"text": DOC, "compression": "kvzip"}, "compression"),
        ({"text": DOC, "txt": DOC}, "txt"),
    ],
)
def test_invalid_create_body_is_422_naming_the_field(
    client: TestClient, fake: FakeContextService, body: dict[str, Any], field: str
) -> None:
    response = client.post("/contexts", json=body)

    error = assert_error(response, 422, "invalid_request", f"{field}: ")
    assert [".".join(map(str, d["loc"][1:])) for d in error["detail"]] == [field]
    assert fake.calls == []


def test_ratio_out_of_range_message(client: TestClient) -> None:
    response = client.post("/contexts", json={"text": DOC, "compression": {"ratio": 1.5}})

    error = assert_error(response, 422, "invalid_request", "compression.ratio: ")
    assert error["message"] == "compression.ratio: Input should be less than or equal to 1"
    assert error["detail"][0]["type"] == "less_than_equal"


def test_method_foo_message(client: TestClient) -> None:
    response = client.post("/contexts", json={"text": DOC, "compression": {"method": "foo"}})

    error = assert_error(response, 422, "invalid_request", "compression.method: ")
    assert (
        "'kvzip', 'kvzip_plus', 'kvzip_head', 'kvzap', 'streaming', 'snapkv', 'h2o' or 'none'"
        in error["message"]
    )


def test_body_that_is_not_json_is_422(client: TestClient) -> None:
    response = client.post(
        "/contexts", content=b"{not json", headers={"content-type": "application/json"}
    )

    error = assert_error(response, 422, "invalid_request", "request body is not valid JSON")
    assert error["detail"][0]["type"] == "json_invalid"


# --- GET / DELETE /contexts/{id} ---------------------------------------------------------------


def test_get_returns_the_registered_context(client: TestClient) -> None:
    created = register(client, display_name="pass key")

    response = client.get(f"/contexts/{created['id']}")

    assert response.status_code == 200
    body = response.json()
    assert body == created
    assert datetime.fromisoformat(body["create_time"]).utcoffset() is not None


def test_delete_is_204_then_404(client: TestClient) -> None:
    context_id = register(client)["id"]

    deleted = client.delete(f"/contexts/{context_id}")

    assert deleted.status_code == 204
    assert deleted.content == b""
    assert_error(client.get(f"/contexts/{context_id}"), 404, "context_not_found", context_id)
    assert_error(client.delete(f"/contexts/{context_id}"), 404, "context_not_found", context_id)


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("DELETE", "", None),
        ("POST", "/query", {"question": "What is the pass key?"}),
    ],
)
def test_unknown_id_is_404(client: TestClient, method: str, suffix: str, body: Any) -> None:
    response = client.request(method, f"/contexts/{UNKNOWN_ID}{suffix}", json=body)

    error = assert_error(response, 404, "context_not_found", f"context '{UNKNOWN_ID}' not found")
    assert error["message"] == f"context '{UNKNOWN_ID}' not found"


@pytest.mark.parametrize(
    "bad_id",
    [
        "abc",
        "ctx_",
        "ctx_" + "0" * 31,
        "ctx_" + "0" * 33,
        "ctx_" + "A" * 32,
        "ctx_" + "g" * 32,
        "CTX_" + "0" * 32,
        "ctx-" + "0" * 32,
    ],
)
@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("DELETE", "", None),
        ("POST", "/query", {"question": "What is the pass key?"}),
        ("POST", "/query", {"bad": "body"}),
    ],
)
def test_malformed_id_is_404_without_asking_the_service(
    client: TestClient,
    fake: FakeContextService,
    bad_id: str,
    method: str,
    suffix: str,
    body: Any,
) -> None:
    response = client.request(method, f"/contexts/{bad_id}{suffix}", json=body)

    assert_error(response, 404, "context_not_found", f"context '{bad_id}' not found")
    assert fake.calls == []


# --- POST /contexts/{id}/query -----------------------------------------------------------------


def test_query_returns_answer_usage_timings(client: TestClient, fake: FakeContextService) -> None:
    context_id = register(client)["id"]

    response = client.post(
        f"/contexts/{context_id}/query",
        json={"question": "What is the pass key?", "max_new_tokens": 16, "temperature": 0.7},
    )

    assert response.status_code == 200, response.text
    assert response.json() == {
        "answer": "48213",
        "usage": {
            "prompt_tokens": 7 + 5,
            "completion_tokens": 3,
            "total_tokens": 7 + 5 + 3,
            "prompt_tokens_details": {"cached_tokens": 7},
        },
        "timings": {"load_s": 0.01, "ttft_s": 0.02, "decode_s": 0.03},
        "finish_reason": "stop",
    }
    asked_id, request = fake.queries[-1]
    assert asked_id == context_id
    assert request.question == "What is the pass key?"
    assert (request.sampling.max_new_tokens, request.sampling.temperature) == (16, 0.7)


def test_query_defaults_are_greedy_and_128_tokens(
    client: TestClient, fake: FakeContextService
) -> None:
    context_id = register(client)["id"]

    client.post(f"/contexts/{context_id}/query", json={"question": "Key?"})

    sampling = fake.queries[-1][1].sampling
    assert (sampling.max_new_tokens, sampling.temperature) == (128, 0.0)


def test_max_new_tokens_over_the_limit_is_422_with_the_limit(
    client: TestClient, fake: FakeContextService
) -> None:
    context_id = register(client)["id"]

    response = client.post(
        f"/contexts/{context_id}/query", json={"question": "Key?", "max_new_tokens": 5000}
    )

    error = assert_error(response, 422, "invalid_request", "")
    assert error["message"] == "max_new_tokens must be <= 256. Given: 5000"
    assert error["detail"][0]["loc"] == ["body", "max_new_tokens"]
    assert error["detail"][0]["ctx"] == {"le": 256}
    assert "query" not in fake.calls


def test_max_new_tokens_at_the_limit_is_accepted(client: TestClient) -> None:
    context_id = register(client)["id"]

    response = client.post(
        f"/contexts/{context_id}/query", json={"question": "Key?", "max_new_tokens": 256}
    )

    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "question"),
        ({"question": ""}, "question"),
        ({"question": "Key?", "max_new_tokens": 0}, "max_new_tokens"),
        ({"question": "Key?", "max_new_tokens": "many"}, "max_new_tokens"),
        ({"question": "Key?", "temperature": -0.1}, "temperature"),
        ({"question": "Key?", "temperature": 2.5}, "temperature"),
        ({"question": "Key?", "max_tokens": 10}, "max_tokens"),
    ],
)
def test_invalid_query_body_is_422(
    client: TestClient, fake: FakeContextService, body: dict[str, Any], field: str
) -> None:
    context_id = register(client)["id"]

    response = client.post(f"/contexts/{context_id}/query", json=body)

    assert_error(response, 422, "invalid_request", f"{field}: ")
    assert "query" not in fake.calls


def test_whitespace_question_is_400(client: TestClient, fake: FakeContextService) -> None:
    context_id = register(client)["id"]

    response = client.post(f"/contexts/{context_id}/query", json={"question": "  \n"})

    assert_error(response, 400, "invalid_input", "question is empty or whitespace only")
    assert "query" not in fake.calls


# --- the error table ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidInputError("bad question"), 400, "invalid_input"),
        (ContextNotReadyError("still processing"), 409, "context_not_ready"),
        (IncompatibleContextError("made by another model"), 409, "incompatible_context"),
        (CorruptContextError("does not parse"), 500, "corrupt_context"),
        (ContextLostError("ctx_1", "evicted"), 410, "context_lost"),
        (TooManyContextsError("this tenant holds 5 contexts"), 429, "too_many_contexts"),
        (StorageQuotaExceededError("this tenant's bytes"), 507, "storage_quota_exceeded"),
        (StorageFullError("the disk tier is full"), 507, "storage_full"),
        (EngineUnavailableError("no model loaded"), 503, "engine_unavailable"),
        (ServiceError("unlisted"), 500, "service"),
    ],
)
def test_service_errors_map_to_statuses(
    client: TestClient, fake: FakeContextService, error: ServiceError, status: int, code: str
) -> None:
    context_id = register(client)["id"]
    fake.fail_with = error

    response = client.post(f"/contexts/{context_id}/query", json={"question": "Key?"})

    body = assert_error(response, status, code, str(error))
    assert body == {"code": code, "message": str(error)}
    assert "retry-after" not in response.headers


def test_queue_full_is_503_with_retry_after(client: TestClient, fake: FakeContextService) -> None:
    fake.fail_with = QueueFullError(retry_after=1.5)

    response = client.post("/contexts", json={"text": DOC})

    assert_error(response, 503, "queue_full", "the work queue is full, retry later")
    assert response.headers["retry-after"] == "2"


def test_unknown_route_uses_the_error_envelope(client: TestClient) -> None:
    assert_error(client.get("/nowhere"), 404, "not_found", "Not Found")
    response = client.put("/contexts")
    assert_error(response, 405, "method_not_allowed", "Method Not Allowed")
    assert "POST" in response.headers["allow"]


# --- health, lifespan, docs --------------------------------------------------------------------


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")

    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_readyz_follows_the_service(client: TestClient, fake: FakeContextService) -> None:
    ready = client.get("/readyz")
    fake.ready = False
    not_ready = client.get("/readyz")

    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert (not_ready.status_code, not_ready.json()) == (503, {"status": "not_ready"})


def test_without_lifespan_routes_are_503(settings: Settings, fake: FakeContextService) -> None:
    client = TestClient(create_app(settings, fake))  # not entered: the service never started

    assert client.get("/readyz").status_code == 503
    assert_error(client.get(f"/contexts/{UNKNOWN_ID}"), 503, "engine_unavailable", "not running")
    assert fake.calls == []


def test_lifespan_starts_and_closes_the_service(
    settings: Settings, fake: FakeContextService
) -> None:
    with TestClient(create_app(settings, fake)):
        assert (fake.started, fake.closed) == (True, False)

    assert fake.closed


def test_failed_start_closes_and_refuses_to_serve(
    settings: Settings, fake: FakeContextService
) -> None:
    fake.fail_start = EngineUnavailableError("no model")

    with pytest.raises(EngineUnavailableError), TestClient(create_app(settings, fake)):
        pass
    assert fake.closed


def test_default_service_is_built_from_settings_in_the_lifespan(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, fake: FakeContextService
) -> None:
    built: list[Settings] = []

    def build(given: Settings) -> FakeContextService:
        built.append(given)
        return fake

    monkeypatch.setattr(app.main, "build_default_service", build)
    application = create_app(settings)
    assert built == []  # nothing is built before startup

    with TestClient(application) as client:
        assert client.get("/readyz").status_code == 200

    assert built == [settings]
    assert fake.started and fake.closed


def test_openapi_documents_the_routes(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()

    assert set(schema["paths"]) == {
        "/healthz",
        "/readyz",
        "/metrics",
        "/contexts",
        "/contexts/{context_id}",
        "/contexts/{context_id}/query",
        "/v1/chat/completions",
        "/v1/models",
    }
    create = schema["paths"]["/contexts"]["post"]["responses"]
    assert {"200", "201", "400", "413", "422", "503"} <= set(create)
    ratio = schema["components"]["schemas"]["CompressionSpec"]["properties"]["ratio"]
    assert (ratio["exclusiveMinimum"], ratio["maximum"]) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (
            TooManyContextsError("this tenant holds 3 contexts, the most allowed"),
            429,
            "too_many_contexts",
        ),
        (
            StorageQuotaExceededError("this tenant's contexts take 9 bytes"),
            507,
            "storage_quota_exceeded",
        ),
    ],
)
def test_a_registration_over_the_tenant_quota_is_refused(
    client: TestClient, fake: FakeContextService, error: ServiceError, status: int, code: str
) -> None:
    fake.fail_with = error

    response = client.post("/contexts", json={"text": DOC})

    assert_error(response, status, code, str(error))
    assert "retry-after" not in response.headers  # waiting does not free a quota
