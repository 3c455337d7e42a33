"""`kvzip.client.Client` against the live app (tests/client/conftest.py): every route it wraps,
streaming, pagination, the error envelope as exceptions, and retries after 429."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

import kvzip.client
from kvzip.client import (
    APIConnectionError,
    Client,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    RequestTooLargeError,
    UnauthorizedError,
    WaitTimeoutError,
)
from tests.client.conftest import KEY, PAGES_KEYS, RATE_BURST, TEXT, UNKNOWN_ID, Live

QUESTION = "When does the museum open?"


@pytest.fixture
def client(live: Live) -> Iterator[Client]:
    with Client(live.url, KEY) as client:
        yield client


def test_the_public_surface_is_exported() -> None:
    assert all(hasattr(kvzip.client, name) for name in kvzip.client.__all__)
    assert "Client" in kvzip.client.__all__ and "AsyncClient" in kvzip.client.__all__


# --- contexts ------------------------------------------------------------------------------------


def test_create_get_update_delete(client: Client) -> None:
    text = TEXT + " The garden is open on Sundays."
    created = client.create_context(
        text, display_name="garden", compression={"ratio": 0.5}, ttl_seconds=600
    )
    again = client.create_context(text, display_name="garden", compression={"ratio": 0.5})
    read = client.get_context(created.id)

    assert created.id.startswith("ctx_") and created.name == f"contexts/{created.id}"
    assert (created.state, created.ready, created.progress) == ("READY", True, 1.0)
    assert created.display_name == "garden" and created.error is None
    assert created.usage.context_tokens > 100
    assert created.compression.method == "kvzip" and created.compression.ratio == 0.5
    assert abs(created.compression.kept_fraction - 0.5) < 0.05 and created.compression.bytes > 0
    assert created.expire_time is not None and created.create_time.tzinfo is not None
    lifetime = created.expire_time - created.create_time
    assert timedelta(seconds=590) <= lifetime <= timedelta(seconds=610)
    assert again.id == created.id and read == again

    longer = client.update_context(created.id, ttl_seconds=7200)
    assert longer.expire_time is not None and longer.expire_time - datetime.now(UTC) > timedelta(
        seconds=7000
    )
    moment = datetime(2100, 1, 1, tzinfo=UTC)
    with pytest.raises(InvalidRequestError) as refused:  # beyond the maximum lifetime
        client.update_context(created.id, expire_time=moment)
    assert (refused.value.status, refused.value.code) == (400, "invalid_input")
    moment = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=3)
    assert client.update_context(created.id, expire_time=moment).expire_time == moment

    client.delete_context(created.id)
    with pytest.raises(NotFoundError) as gone:
        client.get_context(created.id)
    assert (gone.value.status, gone.value.code) == (404, "context_not_found")
    assert gone.value.request_id and created.id in gone.value.message


def test_wait_until_ready_follows_progress_and_keeps_its_deadline(client: Client) -> None:
    text = " ".join(f"Shelf {i} holds atlases and maps of the northern coast." for i in range(40))
    pending = client.create_context(text, wait=False)
    assert pending.state == "PROCESSING"

    with pytest.raises(WaitTimeoutError) as late:
        client.wait_until_ready(pending, timeout=0)
    assert isinstance(late.value, TimeoutError) and pending.id in str(late.value)

    seen: list[float] = []
    ready = client.wait_until_ready(
        pending.id, timeout=60, poll_interval=0.01, on_progress=lambda c: seen.append(c.progress)
    )
    assert ready.state == "READY" and ready.id == pending.id
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_pagination_one_page_and_every_page(live: Live) -> None:
    with Client(live.url, PAGES_KEYS["sync"]) as client:
        ids = [client.create_context(f"Document number {i} of the archive.").id for i in range(3)]
        first = client.list_contexts(page_size=2)
        second = client.list_contexts(page_size=2, page_token=first.next_page_token)
        every = [context.id for context in client.iter_contexts(page_size=1)]
        with pytest.raises(InvalidRequestError) as bad:
            client.list_contexts(page_token="not-a-token")

    assert [c.id for c in first.contexts] == ids[:2] and first.next_page_token
    assert [c.id for c in second.contexts] == ids[2:] and second.next_page_token is None
    assert every == ids  # oldest first, across three pages
    assert bad.value.status == 400


# --- questions -----------------------------------------------------------------------------------


def test_query_and_its_stream_agree(client: Client, context_id: str) -> None:
    answer = client.query(context_id, QUESTION, max_new_tokens=12)
    with client.stream_query(context_id, QUESTION, max_new_tokens=12) as stream:
        deltas = list(stream)

    assert answer.answer and answer.finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens_details.cached_tokens > 100
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.timings.ttft_s > 0
    assert len(deltas) > 1 and all(deltas)
    assert "".join(deltas) == stream.text == stream.result.answer == answer.answer
    assert stream.result.usage == answer.usage
    assert stream.response.headers["content-type"].startswith("text/event-stream")


def test_a_stream_is_refused_before_it_starts_and_can_be_left_early(
    client: Client, context_id: str
) -> None:
    with pytest.raises(NotFoundError):
        client.stream_query(UNKNOWN_ID, QUESTION)

    with client.stream_query(context_id, "Tell me everything.", max_new_tokens=200) as stream:
        first = next(iter(stream))
    assert first and stream.response.is_closed
    with pytest.raises(RuntimeError, match="not finished"):
        _ = stream.result


def test_openai_chat_and_its_stream(client: Client, context_id: str) -> None:
    native = client.query(context_id, QUESTION, max_new_tokens=10)
    messages = [{"role": "user", "content": QUESTION}]
    (model,) = client.list_models()
    completion = client.chat(context_id, messages, max_tokens=10)
    with client.stream_chat(context_id, messages, max_tokens=10, model=model.id) as stream:
        text = "".join(stream)

    assert model.id == completion.model and model.object == "model" and model.created > 0
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.text == native.answer == text == stream.result.text
    assert completion.choices[0].finish_reason == native.finish_reason
    assert completion.usage == native.usage == stream.result.usage
    assert stream.result.choices[0].finish_reason == native.finish_reason


def test_health_readiness_and_metrics(client: Client) -> None:
    assert client.health() == "ok"
    assert client.ready() is True
    assert "kvzip_http_requests_total" in client.metrics()


# --- errors --------------------------------------------------------------------------------------


def test_the_error_envelope_becomes_exceptions(client: Client, context_id: str) -> None:
    with pytest.raises(NotFoundError):
        client.get_context("not-an-id")
    with pytest.raises(InvalidRequestError) as invalid:
        client.query(context_id, QUESTION, max_new_tokens=5000)
    assert (invalid.value.status, invalid.value.code) == (422, "invalid_request")
    assert "max_new_tokens must be <= 1024" in invalid.value.message
    assert invalid.value.detail and invalid.value.detail[0]["loc"] == ["body", "max_new_tokens"]
    with pytest.raises(InvalidRequestError) as blank:
        client.query(context_id, "   ")
    assert (blank.value.status, blank.value.code) == (400, "invalid_input")
    with pytest.raises(RequestTooLargeError) as large:
        client.create_context("word " * 5000)
    assert large.value.status == 413 and "at most" in large.value.message
    with pytest.raises(NotFoundError) as model:
        client.chat(context_id, [{"role": "user", "content": "Hi?"}], model="gpt-4o")
    assert model.value.code == "model_not_found"


def test_keys_are_sent_as_bearer_and_refused_without(live: Live, context_id: str) -> None:
    with Client(live.url) as anonymous, pytest.raises(UnauthorizedError) as missing:
        anonymous.get_context(context_id)
    with Client(live.url, "sk-wrong-key") as wrong, pytest.raises(UnauthorizedError) as unknown:
        wrong.list_models()

    assert (missing.value.status, missing.value.code) == (401, "unauthorized")
    assert "an API key is required" in missing.value.message
    assert "invalid API key" in unknown.value.message


def test_429_carries_retry_after_and_is_retried_when_asked(limited: Live) -> None:
    with Client(limited.url) as client, pytest.raises(RateLimitedError) as limited_error:
        for _ in range(RATE_BURST + 1):  # the burst, then one too many
            client.list_contexts()
    assert limited_error.value.status == 429 and limited_error.value.code == "too_many_requests"
    assert limited_error.value.retry_after is not None and limited_error.value.retry_after >= 1

    with Client(limited.url, max_retries=3) as patient:
        started = time.monotonic()
        page = patient.list_contexts()  # the bucket is empty: it waits Retry-After, then passes
    assert page.contexts == [] and time.monotonic() - started >= 0.5


def test_an_unreachable_server_is_a_connection_error() -> None:
    with Client("http://127.0.0.1:9") as client, pytest.raises(APIConnectionError) as failed:
        client.health()
    assert failed.value.status is None and "cannot reach the server" in str(failed.value)
