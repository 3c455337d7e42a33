"""Server-Sent Events over the service double: framing, final usage event, [DONE], errors."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from service.errors import ContextNotReadyError, EngineUnavailableError, QueueFullError

if TYPE_CHECKING:
    from tests.app.conftest import FakeContextService

DOC = "The pass key is 48213. Remember it."


def parse_sse(lines: list[str]) -> list[Any]:
    """`data:` payloads in order (JSON decoded, "[DONE]" kept as the string)."""
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return [event if event == "[DONE]" else json.loads(event) for event in events]


def stream(client: TestClient, context_id: str, **body: Any) -> tuple[Any, list[Any]]:
    payload = {"question": "What is the pass key?", "stream": True, **body}
    with client.stream("POST", f"/contexts/{context_id}/query", json=payload) as response:
        lines = list(response.iter_lines())
    return response, lines


def register(client: TestClient) -> str:
    context_id: str = client.post("/contexts", json={"text": DOC}).json()["id"]
    return context_id


def test_stream_sends_deltas_then_usage_then_done(
    client: TestClient, fake: FakeContextService
) -> None:
    response, lines = stream(client, register(client), max_new_tokens=16, stop=["\n\n"])

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events = parse_sse(lines)
    assert [e["delta"] for e in events[:5]] == ["The", " pass", " key", " is", " 48213."]
    final = events[5]
    assert final["answer"] == "The pass key is 48213."
    assert final["usage"] == {
        "prompt_tokens": 7 + 5,
        "completion_tokens": 3,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 7},
    }
    assert final["timings"] == {"load_s": 0.01, "ttft_s": 0.02, "decode_s": 0.03}
    assert final["finish_reason"] == "stop"
    assert events[6:] == ["[DONE]"]
    assert all(line == "" for line in lines[1::2])  # one blank line after each event
    sampling = fake.queries[-1][1].sampling
    assert (sampling.max_new_tokens, sampling.stop) == (16, ("\n\n",))
    assert fake.calls[-1] == "stream_query"


def test_sampling_fields_reach_the_service(client: TestClient, fake: FakeContextService) -> None:
    context_id = register(client)
    body = {"question": "Key?", "temperature": 0.8, "top_p": 0.9, "seed": 11, "stop": ["x", "y"]}

    assert client.post(f"/contexts/{context_id}/query", json=body).status_code == 200

    sampling = fake.queries[-1][1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed) == (0.8, 0.9, 11)
    assert sampling.stop == ("x", "y")
    assert fake.calls[-1] == "query"  # not streamed: the plain use case


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop.0"),
        ({"stop": "\n"}, "stop"),
        ({"stream": "maybe"}, "stream"),
    ],
)
def test_invalid_sampling_is_422(client: TestClient, body: dict[str, Any], field: str) -> None:
    context_id = register(client)

    response = client.post(f"/contexts/{context_id}/query", json={"question": "Q?", **body})

    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ContextNotReadyError("still processing"), 409, "context_not_ready"),
        (QueueFullError(retry_after=2.0), 503, "queue_full"),
        (EngineUnavailableError("no model"), 503, "engine_unavailable"),
    ],
)
def test_errors_before_the_first_token_are_statuses(
    client: TestClient, fake: FakeContextService, error: Exception, status: int, code: str
) -> None:
    context_id = register(client)
    fake.fail_with = error  # type: ignore[assignment]

    response, lines = stream(client, context_id)

    assert response.status_code == status
    assert json.loads("".join(lines))["error"]["code"] == code
    if isinstance(error, QueueFullError):
        assert response.headers["retry-after"] == "2"


def test_unknown_context_stream_is_404(client: TestClient) -> None:
    response, lines = stream(client, "ctx_" + "0" * 32)

    assert response.status_code == 404
    assert json.loads("".join(lines))["error"]["code"] == "context_not_found"


def test_an_error_after_the_first_token_is_the_last_event(
    client: TestClient, fake: FakeContextService, monkeypatch: pytest.MonkeyPatch
) -> None:
    context_id = register(client)
    original = fake.stream_query

    async def failing(context_id: str, request: Any) -> Any:
        async for event in original(context_id, request):
            yield event
            raise EngineUnavailableError("the engine died")

    monkeypatch.setattr(fake, "stream_query", failing)

    response, lines = stream(client, context_id)

    assert response.status_code == 200
    events = parse_sse(lines)
    assert events == [
        {"delta": "The"},
        {"error": {"code": "engine_unavailable", "message": "the engine died"}},
    ]
