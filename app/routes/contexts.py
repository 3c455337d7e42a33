"""`/contexts`: register a document, read or delete it, ask it questions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status

from app.dependencies import ContextIdDep, ServiceDep, SettingsDep
from app.errors import limit_exceeded
from app.schemas import (
    CompressionSpec,
    ContextCreate,
    ContextPublic,
    ErrorPublic,
    QueryCreate,
    QueryPublic,
)
from service.config import CompressionConfig
from service.errors import InvalidInputError
from service.types import CreateContextRequest, QueryRequest, SamplingParams

router = APIRouter(prefix="/contexts", tags=["contexts"])

_ERROR_DOCS = {
    400: "Empty or whitespace-only text or question.",
    404: "No such context (or a malformed id).",
    409: "The context is not ready, or was made by another model.",
    413: "The document does not fit the model window.",
    422: "Malformed body or a value out of range.",
    503: "The work queue is full (see Retry-After) or no engine is running.",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorPublic, "description": _ERROR_DOCS[code]} for code in codes}


def _compression(spec: CompressionSpec | None, default: CompressionConfig) -> CompressionConfig:
    """The request's choices; what it leaves out comes from the server's defaults."""
    if spec is None:
        return default
    given = spec.model_fields_set
    return CompressionConfig(
        method=spec.method if "method" in given else default.method,
        ratio=spec.ratio if "ratio" in given else default.ratio,
        chunk_size=default.chunk_size,
    )


def _require_content(field: str, value: str) -> None:
    if not value.strip():
        raise InvalidInputError(f"{field} is empty or whitespace only")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": ContextPublic, "description": "Already registered: the same context."},
        **_errors(400, 413, 422, 503),
    },
)
async def create_context(
    body: ContextCreate, response: Response, service: ServiceDep, settings: SettingsDep
) -> ContextPublic:
    """Register a document: prefill, score and compress its KV cache, store it.

    201 with the new context; 200 with the existing one when this text and these
    compression settings were registered before.
    """
    _require_content("text", body.text)
    request = CreateContextRequest(
        text=body.text,
        display_name=body.display_name,
        compression=_compression(body.compression, settings.default_compression()),
    )
    info, created = await service.create_context(request)
    if not created:
        response.status_code = status.HTTP_200_OK
    return ContextPublic.from_info(info)


@router.get("/{context_id}", responses=_errors(404, 503))
async def read_context(context_id: ContextIdDep, service: ServiceDep) -> ContextPublic:
    """One registered context."""
    return ContextPublic.from_info(await service.get_context(context_id))


@router.delete(
    "/{context_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=_errors(404, 503),
)
async def delete_context(context_id: ContextIdDep, service: ServiceDep) -> None:
    """Remove a context from every tier; later calls on its id are 404."""
    await service.delete_context(context_id)


@router.post("/{context_id}/query", responses=_errors(400, 404, 409, 422, 503))
async def query_context(
    context_id: ContextIdDep, body: QueryCreate, service: ServiceDep, settings: SettingsDep
) -> QueryPublic:
    """Answer one question from the compressed context."""
    if body.max_new_tokens > settings.max_new_tokens_limit:
        raise limit_exceeded("max_new_tokens", settings.max_new_tokens_limit, body.max_new_tokens)
    _require_content("question", body.question)
    sampling = SamplingParams(max_new_tokens=body.max_new_tokens, temperature=body.temperature)
    result = await service.query(
        context_id, QueryRequest(question=body.question, sampling=sampling, ratio=body.ratio)
    )
    return QueryPublic.from_result(result)
