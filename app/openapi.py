"""The OpenAPI document, adjusted to this server: its limits, its auth, links between routes.

- Bounds known only from the settings (max_new_tokens, max_tokens, ttl_seconds) are
  written into the schema as `maximum`, so generated clients and fuzzers see the real limits.
- The Bearer security scheme is declared only when API keys are configured (an open server
  needs no Authorization header).
- Every 422 is the `ErrorPublic` envelope (not FastAPI's default `HTTPValidationError`).
- `POST /contexts` links its `id` to the operations on one context, and its `id` and `model`
  to the body of `POST /v1/chat/completions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from app.errors import ERROR_DOCS
from app.settings import Settings

__all__ = ["install_openapi"]

_ID_LINK = {"context_id": "$response.body#/id"}
_LINKED_OPERATIONS = ("read_context", "update_context", "delete_context", "query_context")
_CHAT_OPERATION = "create_chat_completion"
_CHAT_LINK = {"context_id": "$response.body#/id", "model": "$response.body#/model"}


def _set_maximum(schema: dict[str, Any], maximum: float) -> None:
    """`maximum` on a property schema, or on the non-null branches of its anyOf."""
    branches = schema.get("anyOf", [schema])
    for branch in branches:
        if branch.get("type") in ("integer", "number"):
            branch["maximum"] = maximum


def _apply_limits(document: dict[str, Any], settings: Settings) -> None:
    schemas = document.get("components", {}).get("schemas", {})
    limits = {
        ("QueryCreate", "max_new_tokens"): settings.max_new_tokens_limit,
        ("ChatCompletionCreate", "max_tokens"): settings.max_new_tokens_limit,
        ("ChatCompletionCreate", "max_completion_tokens"): settings.max_new_tokens_limit,
        ("ContextCreate", "ttl_seconds"): settings.max_ttl_seconds,
        ("ContextUpdate", "ttl_seconds"): settings.max_ttl_seconds,
    }
    for (model, field), maximum in limits.items():
        prop = schemas.get(model, {}).get("properties", {}).get(field)
        if prop is not None:
            _set_maximum(prop, maximum)
    query = schemas.get("QueryCreate", {}).get("properties", {}).get("max_new_tokens")
    if query is not None:
        query["default"] = min(query.get("default", 128), settings.max_new_tokens_limit)


def _operations(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [op for path in document.get("paths", {}).values() for op in path.values()]


def _drop_security(document: dict[str, Any]) -> None:
    document.get("components", {}).pop("securitySchemes", None)
    for operation in _operations(document):
        operation.pop("security", None)


def _envelope_422(document: dict[str, Any]) -> None:
    """FastAPI's default 422 body (`HTTPValidationError`) is not ours: every error is the
    `ErrorPublic` envelope."""
    for operation in _operations(document):
        response = operation.get("responses", {}).get("422")
        if response is not None and "HTTPValidationError" in str(response):
            operation["responses"]["422"] = {
                "description": ERROR_DOCS[422],
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorPublic"}}
                },
            }
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _add_links(document: dict[str, Any]) -> None:
    created = document["paths"]["/contexts"]["post"]["responses"]
    links: dict[str, Any] = {
        name: {"operationId": name, "parameters": dict(_ID_LINK)} for name in _LINKED_OPERATIONS
    }
    links[_CHAT_OPERATION] = {"operationId": _CHAT_OPERATION, "requestBody": dict(_CHAT_LINK)}
    for status in ("200", "201", "202"):
        if status in created:
            created[status]["links"] = links


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Replace `app.openapi` by the default generator plus the adjustments above."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            _apply_limits(document, settings)
            _envelope_422(document)
            if not settings.auth_enabled:
                _drop_security(document)
            _add_links(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
