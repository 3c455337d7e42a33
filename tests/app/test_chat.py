"""`/v1/chat/completions` as a conversation (issue 14): system messages are the request's
instructions and earlier turns the history, both on the question side (the context id, and
so the cached context, unchanged); a conversation that does not fit is 413 with both counts;
every field the route does not implement is 400 `unsupported_parameter`, never ignored."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from app.openai_schemas import NEUTRAL
from service.errors import QuestionTooLongError
from service.types import Turn

if TYPE_CHECKING:
    from tests.app.conftest import FakeContextService

DOC = "The pass key is 48213. Remember it."


def assert_error(response: Any, status: int, code: str, *parts: str) -> str:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    message = str(error["message"])
    for part in parts:
        assert part in message, message
    return message


def register(client: TestClient) -> str:
    response = client.post("/contexts", json={"text": DOC})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def chat(context_id: str, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "context_id": context_id, "messages": messages, **extra}


CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the pass key?"},
    {"role": "assistant", "content": "48213."},
    {
        "role": "developer",
        "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "polite."}],
    },
    {"role": "user", "content": "And doubled?"},
]


@pytest.mark.parametrize("stream", [False, True])
def test_system_messages_and_earlier_turns_reach_the_question_side(
    client: TestClient, fake: FakeContextService, stream: bool
) -> None:
    context_id = register(client)

    response = client.post(
        "/v1/chat/completions", json=chat(context_id, CONVERSATION, stream=stream)
    )

    assert response.status_code == 200, response.text
    asked, request = fake.queries[-1]
    assert asked == context_id  # the instructions do not pick another cached context
    assert request.question == "And doubled?"
    assert request.instructions == "Answer in one word.\n\nBe polite."
    assert request.history == (
        Turn("user", "What is the pass key?"),
        Turn("assistant", "48213."),
    )


def test_a_single_user_message_has_no_instructions_or_history(
    client: TestClient, fake: FakeContextService
) -> None:
    context_id = register(client)
    messages = [{"role": "system", "content": "  "}, {"role": "user", "content": "Key?"}]

    assert client.post("/v1/chat/completions", json=chat(context_id, messages)).status_code == 200

    request = fake.queries[-1][1]
    assert (request.question, request.instructions, request.history) == ("Key?", "", ())


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Key?"}, {"role": "assistant", "content": "The key is"}],
        [{"role": "system", "content": "Be brief."}],
        [{"role": "user", "content": "Key?"}, {"role": "user", "content": " "}],
    ],
    ids=["assistant-last", "no-user", "blank-last-user"],
)
def test_a_conversation_must_end_with_a_user_question(
    client: TestClient, fake: FakeContextService, messages: list[dict[str, Any]]
) -> None:
    context_id = register(client)

    response = client.post("/v1/chat/completions", json=chat(context_id, messages))

    assert_error(response, 400, "invalid_input", "must end with a user message")
    assert fake.queries == []


def test_a_conversation_over_the_question_budget_is_413_with_both_counts(
    client: TestClient, fake: FakeContextService
) -> None:
    context_id = register(client)
    fake.fail_with = QuestionTooLongError(5120, 3200)

    response = client.post("/v1/chat/completions", json=chat(context_id, CONVERSATION))

    assert_error(response, 413, "question_too_long", "5120 tokens", "room for 3200")
    assert response.json()["error"]["message"].count("max_new_tokens") == 1


def test_the_native_route_shares_the_413(client: TestClient, fake: FakeContextService) -> None:
    context_id = register(client)
    fake.fail_with = QuestionTooLongError(900, 100)

    response = client.post(f"/contexts/{context_id}/query", json={"question": "q"})

    assert_error(response, 413, "question_too_long", "900 tokens", "room for 100")


UNSUPPORTED = {
    "n": 2,
    "logprobs": True,
    "top_logprobs": 3,
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "functions": [{"name": "f"}],
    "response_format": {"type": "json_object"},
    "logit_bias": {"50256": -100},
    "presence_penalty": 0.5,
    "frequency_penalty": -1,
    "tool_choice": "auto",
    "user": "u-1",
    "parallel_tool_calls": False,
    "modalities": ["text"],
}


@pytest.mark.parametrize(("field", "value"), UNSUPPORTED.items(), ids=list(UNSUPPORTED))
def test_each_unsupported_field_is_400_naming_it(
    client: TestClient, fake: FakeContextService, field: str, value: Any
) -> None:
    context_id = register(client)
    body = chat(context_id, [{"role": "user", "content": "Key?"}], **{field: value})

    response = client.post("/v1/chat/completions", json=body)

    assert_error(response, 400, "unsupported_parameter", f"'{field}'", "not implemented")
    assert fake.queries == []


@pytest.mark.parametrize(
    ("message", "named"),
    [
        ({"role": "user", "content": "Key?", "name": "ada"}, "'name'"),
        ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "'tool_call_id'"),
        ({"role": "tool", "content": "42"}, "role 'tool'"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, "'image_url'"),
        ({"role": "user", "content": [{"type": "input_audio", "text": "x"}]}, "'input_audio'"),
    ],
    ids=["name", "tool-call-id", "tool-role", "image-part", "audio-part"],
)
def test_unsupported_message_fields_are_400_naming_them(
    client: TestClient, fake: FakeContextService, message: dict[str, Any], named: str
) -> None:
    context_id = register(client)
    messages = [message, {"role": "user", "content": "Key?"}]

    response = client.post("/v1/chat/completions", json=chat(context_id, messages))

    text = assert_error(response, 400, "unsupported_parameter", named)
    assert text.startswith("messages.0")
    assert fake.queries == []


def test_all_unsupported_fields_are_named_at_once(client: TestClient) -> None:
    context_id = register(client)
    body = chat(context_id, [{"role": "user", "content": "Key?"}], n=3, logprobs=True, user="u")

    unknown = client.post("/v1/chat/completions", json=body)
    body.pop("user")
    refused = client.post("/v1/chat/completions", json=body)

    assert_error(unknown, 400, "unsupported_parameter", "'user'")
    assert_error(refused, 400, "unsupported_parameter", "'n'", "'logprobs'", "given 3")


def test_neutral_values_of_unsupported_fields_are_accepted(
    client: TestClient, fake: FakeContextService
) -> None:
    context_id = register(client)
    neutral = {
        "n": 1,
        "logprobs": False,
        "top_logprobs": None,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "tools": None,
        "stream_options": None,
    }
    body = chat(context_id, [{"role": "user", "content": "Key?"}], **neutral)

    response = client.post("/v1/chat/completions", json=body)

    assert response.status_code == 200, response.text
    assert len(fake.queries) == 1


def test_the_schema_lists_what_each_unsupported_field_accepts(
    client: TestClient, fake: FakeContextService
) -> None:
    """Found by schemathesis: the schema allowed any `n` >= 1 and any penalty, so almost every
    generated chat request was a 400. Each field's `enum` is null and its neutral values, and
    every one of them is accepted."""
    properties = client.get("/openapi.json").json()["components"]["schemas"][
        "ChatCompletionCreate"
    ]["properties"]
    context_id = register(client)

    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == [
        "system",
        "developer",
        "user",
        "assistant",
    ]
    assert schemas["TextPart"]["properties"]["type"]["enum"] == ["text"]
    for field in NEUTRAL:
        accepted = properties[field]["enum"]
        assert accepted[0] is None and len(accepted) <= 2, (field, accepted)
        for value in accepted:
            body = chat(context_id, [{"role": "user", "content": "Key?"}], **{field: value})
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, (field, value, response.text)


def test_a_wrong_type_is_still_422(client: TestClient) -> None:
    context_id = register(client)
    body = chat(context_id, [{"role": "user", "content": "Key?"}], n="two")

    response = client.post("/v1/chat/completions", json=body)

    assert_error(response, 422, "invalid_request", "n")


def test_openapi_documents_the_unsupported_fields_and_the_413(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    chat_schema = schema["components"]["schemas"]["ChatCompletionCreate"]
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]

    assert chat_schema["additionalProperties"] is False
    assert "only null or 1" in chat_schema["properties"]["n"]["description"]
    assert "413" in responses and "unsupported_parameter" in responses["400"]["description"]
