"""The OpenAPI document: examples everywhere, the server's own limits, auth only when keyed,
one error envelope, links; and the request-type rules it promises."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

if TYPE_CHECKING:
    from tests.app.conftest import FakeContextService


def document(settings: Settings, fake: FakeContextService) -> dict[str, Any]:
    with TestClient(create_app(settings, fake)) as client:
        result: dict[str, Any] = client.get("/openapi.json").json()
    return result


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    ]


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        resolved: dict[str, Any] = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
        return resolved
    return schema


def has_example(doc: dict[str, Any], content: dict[str, Any]) -> bool:
    for media in content.values():
        if "example" in media or "examples" in media:
            return True
        if "examples" in resolve(doc, media.get("schema", {})):
            return True
    return False


def test_every_operation_has_a_summary_id_and_examples(
    settings: Settings, fake: FakeContextService
) -> None:
    doc = document(settings, fake)

    for method, path, op in operations(doc):
        assert op.get("operationId") and op.get("summary"), (method, path)
        if "requestBody" in op:
            assert has_example(doc, op["requestBody"]["content"]), (method, path, "request")
        ok = next(code for code in op["responses"] if code.startswith("2"))
        content = op["responses"][ok].get("content")
        if content:
            assert has_example(doc, content), (method, path, "response")


def test_errors_are_one_envelope(settings: Settings, fake: FakeContextService) -> None:
    doc = document(settings, fake)

    assert "HTTPValidationError" not in json.dumps(doc)
    for method, path, op in operations(doc):
        for code, response in op["responses"].items():
            if code.startswith(("4", "5")) and path != "/readyz":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorPublic"}, (method, path)


def test_limits_are_the_servers_own(fake: FakeContextService) -> None:
    settings = Settings(max_new_tokens_limit=64, max_ttl_seconds=7200)
    schemas = document(settings, fake)["components"]["schemas"]

    query = schemas["QueryCreate"]["properties"]["max_new_tokens"]
    assert (query["maximum"], query["default"]) == (64, 64)
    chat = schemas["ChatCompletionCreate"]["properties"]
    assert chat["max_tokens"]["anyOf"][0]["maximum"] == 64
    assert chat["max_completion_tokens"]["anyOf"][0]["maximum"] == 64
    assert schemas["ContextCreate"]["properties"]["ttl_seconds"]["anyOf"][0]["maximum"] == 7200
    assert schemas["ContextUpdate"]["properties"]["ttl_seconds"]["maximum"] == 7200
    assert schemas["ContextUpdate"]["oneOf"] == [
        {"required": ["ttl_seconds"]},
        {"required": ["expire_time"]},
    ]


def test_bearer_auth_is_declared_only_when_keyed(fake: FakeContextService) -> None:
    open_doc = document(Settings(), fake)
    keyed_doc = document(Settings(api_keys={"sk-team-a-key-0001": "team-a"}), fake)

    assert "securitySchemes" not in open_doc.get("components", {})
    assert all("security" not in op for _, _, op in operations(open_doc))
    assert keyed_doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"HTTPBearer": []} in keyed_doc["paths"]["/contexts"]["post"]["security"]


def test_created_contexts_link_to_their_operations(
    settings: Settings, fake: FakeContextService
) -> None:
    links = document(settings, fake)["paths"]["/contexts"]["post"]["responses"]["201"]["links"]

    assert set(links) == {
        "read_context",
        "update_context",
        "delete_context",
        "query_context",
        "create_chat_completion",
    }
    assert links["read_context"]["parameters"] == {"context_id": "$response.body#/id"}
    assert links["create_chat_completion"]["requestBody"] == {
        "context_id": "$response.body#/id",
        "model": "$response.body#/model",
    }


def test_a_wrong_method_names_every_allowed_one(client: TestClient) -> None:
    response = client.put("/contexts/ctx_" + "0" * 32)

    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET, HEAD, PATCH"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_the_default_max_new_tokens_never_exceeds_the_limit(fake: FakeContextService) -> None:
    with TestClient(create_app(Settings(max_new_tokens_limit=16), fake)) as client:
        context_id = client.post("/contexts", json={"text": "The pass key is 48213."}).json()["id"]
        response = client.post(f"/contexts/{context_id}/query", json={"question": "Key?"})

    assert response.status_code == 200, response.text
    assert fake.queries[-1][1].sampling.max_new_tokens == 16


@pytest.mark.parametrize(
    ("body", "accepted"),
    [
        ({"max_new_tokens": 8.0}, True),  # JSON's integral float is an integer
        ({"max_new_tokens": 8.5}, False),
        ({"max_new_tokens": "8"}, False),
        ({"stream": 0}, False),
        ({"temperature": "0.5"}, False),
        ({"seed": 2**53}, False),
        ({"seed": 2**53 - 1}, True),
    ],
)
def test_request_types_are_strict(client: TestClient, body: dict[str, Any], accepted: bool) -> None:
    context_id = client.post("/contexts", json={"text": "The pass key is 48213."}).json()["id"]

    response = client.post(f"/contexts/{context_id}/query", json={"question": "Key?", **body})

    assert (response.status_code == 200) is accepted, response.text


@pytest.mark.parametrize("field", ["text", "system"])
def test_text_that_is_not_unicode_is_400(client: TestClient, field: str) -> None:
    body = {"text": "fine", field: "broken \ud800 text"}
    raw = json.dumps(body)  # json keeps the lone surrogate as \\ud800

    response = client.post("/contexts", content=raw, headers={"content-type": "application/json"})

    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == (
        f"{field} is not valid Unicode (character 7 is a lone surrogate)"
    )


PYDANTIC_ONLY_KEYWORDS = {"ge", "gt", "le", "lt", "min_length", "max_length", "multiple_of"}
"""Constraint names pydantic writes through untranslated when a `Field` bound sits on a
union it cannot push into: JSON Schema ignores them, so clients would see no bound."""


def _keywords(schema: Any, path: str = "") -> list[str]:
    if isinstance(schema, list):
        return [hit for i, item in enumerate(schema) for hit in _keywords(item, f"{path}/{i}")]
    if not isinstance(schema, dict):
        return []
    hits = []
    for key, value in schema.items():
        if key in PYDANTIC_ONLY_KEYWORDS and not path.endswith("/properties"):
            hits.append(f"{path}/{key}")
        hits += _keywords(value, f"{path}/{key}")
    return hits


def test_every_bound_is_a_json_schema_keyword(settings: Settings, fake: FakeContextService) -> None:
    """Found by schemathesis: `n` carried `ge: 1`, so `n: 0` was schema-valid but 422."""
    doc = document(settings, fake)

    assert _keywords(doc) == []
    n = doc["components"]["schemas"]["ChatCompletionCreate"]["properties"]["n"]
    assert {"type": "integer", "minimum": 1} in n["anyOf"]
