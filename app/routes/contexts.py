"""`/contexts`: register, list, read, re-expire and delete documents; ask them questions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from app.answers import CLIENT_GONE, start_answer, whole_answer
from app.auth import PrincipalDep
from app.dependencies import ContextIdDep, ServiceDep, SettingsDep, require_text
from app.errors import documented, invalid_field, limit_exceeded
from app.schemas import (
    CompressionSpec,
    ContextCreate,
    ContextListPublic,
    ContextPublic,
    ContextUpdate,
    QueryChunkPublic,
    QueryCreate,
    QueryPublic,
)
from app.settings import Settings
from app.sse import DONE, EVENT_SCHEMA, EventStreamResponse, aclose, error_event, event
from service.config import CompressionConfig
from service.types import CreateContextRequest, QueryEvent, QueryRequest, SamplingParams

router = APIRouter(prefix="/contexts", tags=["contexts"])

_SSE_EXAMPLE = (
    'data: {"delta":"The pass"}\n\n'
    'data: {"delta":" key is 48213."}\n\n'
    'data: {"answer":"The pass key is 48213.","usage":{"prompt_tokens":1660,'
    '"completion_tokens":9,"total_tokens":1669,"prompt_tokens_details":{"cached_tokens":1648}},'
    '"timings":{"load_s":0.002,"ttft_s":0.09,"decode_s":0.21},"finish_reason":"stop"}\n\n'
    "data: [DONE]\n\n"
)


def _compression(spec: CompressionSpec | None, default: CompressionConfig) -> CompressionConfig:
    """The request's choices; what it leaves out comes from the server's defaults."""
    if spec is None:
        return default
    given = spec.model_fields_set
    return CompressionConfig(
        method=spec.method if "method" in given else default.method,
        ratio=spec.ratio if "ratio" in given else default.ratio,
        chunk_size=default.chunk_size,
        threshold=spec.threshold,
        quantization=spec.quantization or default.quantization,
        group_size=spec.group_size,
    )


def _check_ttl(ttl_seconds: float | None, settings: Settings) -> None:
    if ttl_seconds is not None and ttl_seconds > settings.max_ttl_seconds:
        raise limit_exceeded("ttl_seconds", settings.max_ttl_seconds, ttl_seconds)


@router.post(
    "",
    operation_id="create_context",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": ContextPublic, "description": "Already registered: the same context."},
        202: {
            "model": ContextPublic,
            "description": '`"wait": false`: accepted, state PROCESSING; poll GET.',
        },
        **documented(400, 401, 413, 422, 429, 503, 507),
    },
)
async def create_context(
    principal: PrincipalDep,
    body: ContextCreate,
    response: Response,
    service: ServiceDep,
    settings: SettingsDep,
) -> ContextPublic:
    """Register a document: prefill, score and compress its KV cache, store it.

    201 with the new context; 200 with the existing one when this text, system instruction
    and compression were registered before (its expiry is extended to at least
    `ttl_seconds`); 202 at once with `"wait": false` (state PROCESSING, `progress` on GET).
    """
    require_text("text", body.text)
    require_text("system", body.system, blank_ok=True)
    _check_ttl(body.ttl_seconds, settings)
    request = CreateContextRequest(
        text=body.text,
        display_name=body.display_name,
        compression=_compression(body.compression, settings.default_compression()),
        tenant=principal.tenant,
        system=body.system,
        ttl_seconds=body.ttl_seconds,
        wait=body.wait,
    )
    info, created = await service.create_context(request)
    if info.state == "PROCESSING":
        response.status_code = status.HTTP_202_ACCEPTED
    elif not created:
        response.status_code = status.HTTP_200_OK
    return ContextPublic.from_info(info)


@router.get("", operation_id="list_contexts", responses=documented(400, 401, 429, 503))
async def list_contexts(
    principal: PrincipalDep,
    service: ServiceDep,
    page_size: Annotated[
        int, Query(ge=1, le=1000, description="Contexts per page.", examples=[50])
    ] = 50,
    page_token: Annotated[
        str | None,
        Query(max_length=512, description="`next_page_token` of the previous page."),
    ] = None,
) -> ContextListPublic:
    """The caller's contexts (every tenant's for the admin key), oldest first."""
    page = await service.list_contexts(principal.scope, page_size, page_token)
    return ContextListPublic(
        contexts=[ContextPublic.from_info(info) for info in page.contexts],
        next_page_token=page.next_page_token,
    )


@router.get("/{context_id}", operation_id="read_context", responses=documented(401, 404, 429, 503))
async def read_context(
    principal: PrincipalDep, context_id: ContextIdDep, service: ServiceDep
) -> ContextPublic:
    """One context: its state, `progress` while PROCESSING, expiry and compression."""
    return ContextPublic.from_info(await service.get_context(context_id, principal.scope))


@router.patch(
    "/{context_id}",
    operation_id="update_context",
    responses=documented(400, 401, 404, 422, 429, 503),
)
async def update_context(
    principal: PrincipalDep,
    context_id: ContextIdDep,
    body: ContextUpdate,
    service: ServiceDep,
    settings: SettingsDep,
) -> ContextPublic:
    """Change the expiry (only): `ttl_seconds` from now, or an `expire_time`."""
    given = body.model_fields_set & {"ttl_seconds", "expire_time"}
    if len(given) != 1 or (body.ttl_seconds is None and body.expire_time is None):
        raise invalid_field("ttl_seconds", "give exactly one of ttl_seconds or expire_time", None)
    _check_ttl(body.ttl_seconds, settings)
    expire = body.expire_time
    if body.ttl_seconds is not None:
        expire = datetime.now(UTC) + timedelta(seconds=body.ttl_seconds)
    assert expire is not None
    info = await service.update_context(context_id, expire, principal.scope)
    return ContextPublic.from_info(info)


@router.delete(
    "/{context_id}",
    operation_id="delete_context",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=documented(401, 404, 429, 503),
)
async def delete_context(
    principal: PrincipalDep, context_id: ContextIdDep, service: ServiceDep
) -> None:
    """Remove a context from every tier (stopping its ingest); later calls on it are 404."""
    await service.delete_context(context_id, principal.scope)


@router.post(
    "/{context_id}/query",
    operation_id="query_context",
    response_model=QueryPublic,
    responses={
        200: {
            "description": "The answer (JSON), or with `stream: true` an event stream.",
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA, "example": _SSE_EXAMPLE}},
        },
        **documented(400, 401, 404, 409, 410, 422, 429, 503),
    },
)
async def query_context(
    principal: PrincipalDep,
    context_id: ContextIdDep,
    body: QueryCreate,
    service: ServiceDep,
    settings: SettingsDep,
    http: Request,
) -> QueryPublic | Response:
    """Answer one question from the compressed context.

    With `"stream": true` the answer comes as Server-Sent Events: `{"delta": ...}` per text
    chunk, then the full answer with usage and timings, then `[DONE]`. Closing the
    connection stops the generation.
    """
    max_new = body.max_new_tokens
    if "max_new_tokens" not in body.model_fields_set:  # the default never exceeds the limit
        max_new = min(max_new, settings.max_new_tokens_limit)
    if max_new > settings.max_new_tokens_limit:
        raise limit_exceeded("max_new_tokens", settings.max_new_tokens_limit, max_new)
    require_text("question", body.question)
    sampling = SamplingParams(
        max_new_tokens=max_new,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=tuple(body.stop or ()),
    )
    request = QueryRequest(
        question=body.question, sampling=sampling, tenant=principal.scope, ratio=body.ratio
    )
    if body.stream:
        events = await start_answer(service, context_id, request)
        return EventStreamResponse(_answer_events(events))
    result = await whole_answer(http, service, context_id, request)
    if result is None:  # the client went away: its generation was stopped
        return Response(status_code=CLIENT_GONE)
    return QueryPublic.from_result(result)


async def _answer_events(events: AsyncIterator[QueryEvent]) -> AsyncIterator[bytes]:
    try:
        async for item in events:
            if item.result is not None:
                yield event(QueryPublic.from_result(item.result))
            elif item.delta:
                yield event(QueryChunkPublic(delta=item.delta))
        yield DONE
    except Exception as exc:  # after the 200: the error travels as the last event
        yield error_event(exc)
    finally:
        await aclose(events)
