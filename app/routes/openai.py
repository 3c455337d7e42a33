"""OpenAI-compatible `/v1/chat/completions` and `/v1/models` over the compressed contexts.

The last message (a user message) is the question; earlier user and assistant messages are
the conversation before it and system messages the request's instructions, all on the
question side of the prompt (the cached context stays the one `context_id` names).
`context_id` (in OpenAI clients, `extra_body`) picks the context;
`usage.prompt_tokens_details.cached_tokens` counts the context tokens served from the cache.
Streaming follows OpenAI: a role chunk, content chunks, a chunk with `finish_reason`, a
usage chunk when `stream_options.include_usage`, then `[DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response

from app.answers import CLIENT_GONE, start_answer, whole_answer
from app.auth import PrincipalDep
from app.dependencies import ServiceDep, SettingsDep, require_text
from app.errors import documented, error_response, limit_exceeded
from app.openai_schemas import (
    SYSTEM_ROLES,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChatCompletionPublic,
    ChatMessage,
    ChatUsage,
    ChunkChoice,
    ChunkDelta,
    ModelListPublic,
    ModelPublic,
)
from app.sse import DONE, EVENT_SCHEMA, EventStreamResponse, aclose, error_event, event
from service.errors import InvalidInputError
from service.types import QueryEvent, QueryRequest, QueryResult, SamplingParams, Turn

router = APIRouter(prefix="/v1", tags=["openai"])

DEFAULT_MAX_TOKENS = 128
_STARTED = int(time.time())

_SSE_EXAMPLE = (
    'data: {"id":"chatcmpl-7d1f","object":"chat.completion.chunk","created":1741964966,'
    '"model":"SmolLM2-135M-Instruct","choices":[{"index":0,"delta":{"role":"assistant",'
    '"content":""}}]}\n\n'
    'data: {"id":"chatcmpl-7d1f","object":"chat.completion.chunk","created":1741964966,'
    '"model":"SmolLM2-135M-Instruct","choices":[{"index":0,"delta":{"content":"48213"}}]}\n\n'
    'data: {"id":"chatcmpl-7d1f","object":"chat.completion.chunk","created":1741964966,'
    '"model":"SmolLM2-135M-Instruct","choices":[{"index":0,"delta":{},'
    '"finish_reason":"stop"}]}\n\n'
    "data: [DONE]\n\n"
)


@router.get("/models", operation_id="list_models", responses=documented(401, 429))
async def list_models(principal: PrincipalDep, service: ServiceDep) -> ModelListPublic:
    """The model this server answers with (OpenAI's model list)."""
    return ModelListPublic(data=[ModelPublic(id=service.model_name, created=_STARTED)])


@router.post(
    "/chat/completions",
    operation_id="create_chat_completion",
    response_model=ChatCompletionPublic,
    responses={
        200: {
            "description": "A chat.completion, or with `stream: true` an event stream.",
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA, "example": _SSE_EXAMPLE}},
        },
        **documented(400, 401, 404, 409, 410, 413, 422, 429, 503),
    },
)
async def create_chat_completion(
    principal: PrincipalDep,
    body: ChatCompletionCreate,
    service: ServiceDep,
    settings: SettingsDep,
    http: Request,
) -> Any:
    """Answer the last user message from the compressed context `context_id`, after the
    system messages (instructions) and the earlier turns of the conversation."""
    if body.model != service.model_name:
        message = f"model {body.model!r} is not served here; GET /v1/models lists the one that is"
        return error_response(404, "model_not_found", message)
    default = min(DEFAULT_MAX_TOKENS, settings.max_new_tokens_limit)
    max_new = body.max_completion_tokens or body.max_tokens or default
    if max_new > settings.max_new_tokens_limit:
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise limit_exceeded(field, settings.max_new_tokens_limit, max_new)
    sampling = SamplingParams(
        max_new_tokens=max_new,
        temperature=body.temperature or 0.0,
        top_p=body.top_p or 1.0,
        seed=body.seed,
        stop=body.stop_sequences,
    )
    request = _conversation(body.messages, sampling, principal.scope)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        events = await start_answer(service, body.context_id, request)
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _chunks(events, completion_id, service.model_name, usage)
        return EventStreamResponse(chunks)
    result = await whole_answer(http, service, body.context_id, request)
    if result is None:  # the client went away: its generation was stopped
        return Response(status_code=CLIENT_GONE)
    return _completion(result, completion_id, service.model_name)


def _conversation(
    messages: list[ChatMessage], sampling: SamplingParams, tenant: str
) -> QueryRequest:
    """System messages (in order) as the instructions, then the turns; the last message,
    a user message, is the question."""
    for index, message in enumerate(messages):
        require_text(f"messages[{index}].content", message.text, blank_ok=True)
    instructions = [m.text for m in messages if m.role in SYSTEM_ROLES and m.text.strip()]
    turns = [Turn(m.role, m.text) for m in messages if m.role not in SYSTEM_ROLES]
    if not turns or turns[-1].role != "user" or not turns[-1].text.strip():
        raise InvalidInputError(
            "messages must end with a user message that has text (the question; an "
            "assistant message after it is not supported)"
        )
    return QueryRequest(
        turns[-1].text,
        sampling,
        tenant=tenant,
        instructions="\n\n".join(instructions),
        history=tuple(turns[:-1]),
    )


def _completion(result: QueryResult, completion_id: str, model: str) -> ChatCompletionPublic:
    choice = ChatChoice(
        message=AssistantMessage(content=result.answer), finish_reason=result.finish_reason
    )
    return ChatCompletionPublic(
        id=completion_id,
        created=int(time.time()),
        model=model,
        choices=[choice],
        usage=ChatUsage.from_result(result),
    )


async def _chunks(
    events: AsyncIterator[QueryEvent], completion_id: str, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(choices: list[ChunkChoice], usage: ChatUsage | None = None) -> bytes:
        body = ChatCompletionChunk(
            id=completion_id, created=created, model=model, choices=choices, usage=usage
        )
        return event(body)

    try:
        yield chunk([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
        result: QueryResult | None = None
        async for item in events:
            if item.delta:
                yield chunk([ChunkChoice(delta=ChunkDelta(content=item.delta))])
            result = item.result or result
        assert result is not None
        yield chunk([ChunkChoice(delta=ChunkDelta(), finish_reason=result.finish_reason)])
        if include_usage:
            yield chunk([], ChatUsage.from_result(result))
        yield DONE
    except Exception as exc:  # after the 200: the error travels as the last event
        yield error_event(exc)
    finally:
        await aclose(events)


__all__ = ["router"]
