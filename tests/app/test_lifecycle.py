"""Context lifecycle over HTTP (the service double): 202, listing pages, PATCH expiry, TTL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

if TYPE_CHECKING:
    from tests.app.conftest import FakeContextService

DOC = "The pass key is 48213. Remember it."


def assert_error(response: Any, status: int, code: str, message: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert message in error["message"], error["message"]
    return error


# --- POST /contexts: system, ttl_seconds, wait ---------------------------------------------------


def test_create_passes_system_ttl_and_wait(client: TestClient, fake: FakeContextService) -> None:
    body = {"text": DOC, "system": "Answer briefly.", "ttl_seconds": 120, "wait": True}

    response = client.post("/contexts", json=body)

    assert response.status_code == 201, response.text
    request = fake.created_requests[-1]
    assert (request.system, request.ttl_seconds, request.wait) == ("Answer briefly.", 120, True)
    assert request.tenant == ""
    created = datetime.fromisoformat(response.json()["create_time"])
    expires = datetime.fromisoformat(response.json()["expire_time"])
    assert expires - created == timedelta(seconds=120)


def test_defaults_are_one_hour_and_waiting(client: TestClient, fake: FakeContextService) -> None:
    body = client.post("/contexts", json={"text": DOC}).json()

    request = fake.created_requests[-1]
    assert (request.system, request.ttl_seconds, request.wait) == (None, None, True)
    assert (body["state"], body["progress"]) == ("READY", 1.0)
    assert body["error"] is None


def test_wait_false_is_202_processing_then_get_shows_progress(client: TestClient) -> None:
    accepted = client.post("/contexts", json={"text": DOC, "wait": False})

    assert accepted.status_code == 202, accepted.text
    assert (accepted.json()["state"], accepted.json()["progress"]) == ("PROCESSING", 0.25)
    context_id = accepted.json()["id"]
    polled = client.get(f"/contexts/{context_id}").json()
    assert (polled["state"], polled["progress"]) == ("PROCESSING", 0.75)
    done = client.get(f"/contexts/{context_id}").json()
    assert (done["state"], done["progress"]) == ("READY", 1.0)


def test_ttl_over_the_maximum_is_422_with_the_limit(
    fake: FakeContextService, settings: Settings
) -> None:
    limited = settings.model_copy(update={"max_ttl_seconds": 600.0})
    with TestClient(create_app(limited, fake)) as client:
        response = client.post("/contexts", json={"text": DOC, "ttl_seconds": 601})

    error = assert_error(response, 422, "invalid_request", "ttl_seconds must be <= 600.0")
    assert error["detail"][0]["loc"] == ["body", "ttl_seconds"]
    assert fake.created_requests == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": DOC, "ttl_seconds": 0}, "ttl_seconds"),
        ({"text": DOC, "ttl_seconds": -5}, "ttl_seconds"),
        ({"text": DOC, "ttl_seconds": "soon"}, "ttl_seconds"),
        ({"text": DOC, "wait": "later"}, "wait"),
        ({"text": DOC, "system": 3}, "system"),
    ],
)
def test_invalid_lifecycle_fields_are_422(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    assert_error(client.post("/contexts", json=body), 422, "invalid_request", f"{field}: ")


# --- GET /contexts -------------------------------------------------------------------------------


def _register(client: TestClient, count: int) -> list[str]:
    return [
        client.post("/contexts", json={"text": f"{DOC} {i}"}).json()["id"] for i in range(count)
    ]


def test_listing_follows_page_tokens(client: TestClient, fake: FakeContextService) -> None:
    ids = _register(client, 3)

    first = client.get("/contexts", params={"page_size": 2})
    assert first.status_code == 200, first.text
    token = first.json()["next_page_token"]
    second = client.get("/contexts", params={"page_size": 2, "page_token": token}).json()

    assert [c["id"] for c in first.json()["contexts"]] + [c["id"] for c in second["contexts"]] == (
        sorted(ids)  # same create_time: ties go by id
    )
    assert second["next_page_token"] is None
    assert fake.listings[0] == ("", 2, None)
    assert first.json()["contexts"][0]["name"].startswith("contexts/ctx_")


def test_listing_defaults_to_50(client: TestClient, fake: FakeContextService) -> None:
    assert client.get("/contexts").json() == {"contexts": [], "next_page_token": None}
    assert fake.listings == [("", 50, None)]


@pytest.mark.parametrize("params", [{"page_size": 0}, {"page_size": 1001}, {"page_size": "x"}])
def test_listing_bounds_are_422(client: TestClient, params: dict[str, Any]) -> None:
    assert_error(client.get("/contexts", params=params), 422, "invalid_request", "page_size")


def test_a_foreign_page_token_is_400(client: TestClient) -> None:
    response = client.get("/contexts", params={"page_token": "bm90IGEgdG9rZW4="})

    assert_error(response, 400, "invalid_input", "page_token is not a token this service issued")


# --- PATCH /contexts/{id} ------------------------------------------------------------------------


def test_patch_ttl_seconds_sets_the_expiry_from_now(
    client: TestClient, fake: FakeContextService
) -> None:
    context_id = _register(client, 1)[0]
    before = datetime.now(UTC)

    response = client.patch(f"/contexts/{context_id}", json={"ttl_seconds": 7200})

    assert response.status_code == 200, response.text
    (updated_id, expire, tenant) = fake.updates[-1]
    assert (updated_id, tenant) == (context_id, "")
    assert before + timedelta(seconds=7199) < expire < datetime.now(UTC) + timedelta(seconds=7201)
    assert datetime.fromisoformat(response.json()["expire_time"]) == expire


def test_patch_expire_time_is_passed_through(client: TestClient, fake: FakeContextService) -> None:
    context_id = _register(client, 1)[0]

    response = client.patch(
        f"/contexts/{context_id}", json={"expire_time": "2030-01-01T12:00:00+02:00"}
    )

    assert response.status_code == 200, response.text
    assert fake.updates[-1][1] == datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
    assert response.json()["expire_time"] == "2030-01-01T10:00:00Z"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"ttl_seconds": 60, "expire_time": "2030-01-01T00:00:00Z"},
        {"ttl_seconds": None},
    ],
)
def test_patch_needs_exactly_one_expiry(
    client: TestClient, fake: FakeContextService, body: dict[str, Any]
) -> None:
    context_id = _register(client, 1)[0]

    response = client.patch(f"/contexts/{context_id}", json=body)

    assert_error(response, 422, "invalid_request", "give exactly one of ttl_seconds or expire_time")
    assert fake.updates == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"display_name": "renamed"}, "display_name"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"expire_time": "tomorrow"}, "expire_time"),
    ],
)
def test_patch_changes_only_the_expiry(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    context_id = _register(client, 1)[0]

    assert_error(client.patch(f"/contexts/{context_id}", json=body), 422, "invalid_request", field)


def test_patch_of_an_unknown_context_is_404(client: TestClient) -> None:
    response = client.patch("/contexts/ctx_" + "0" * 32, json={"ttl_seconds": 60})

    assert_error(response, 404, "context_not_found", "not found")
