"""`kvzip.client.AsyncClient` against the live app: the same surface as `Client`, awaited."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from kvzip.client import (
    APIConnectionError,
    AsyncClient,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    UnauthorizedError,
    WaitTimeoutError,
)
from tests.client.conftest import KEY, PAGES_KEYS, RATE_BURST, TEXT, UNKNOWN_ID, Live

QUESTION = "How much do tickets cost?"


@pytest.fixture
async def client(live: Live) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(live.url, KEY) as client:
        yield client


async def test_create_get_update_delete(client: AsyncClient) -> None:
    text = TEXT + " The library lends umbrellas."
    created = await client.create_context(text, display_name="library", system="Be brief.")
    read = await client.get_context(created.id)
    longer = await client.update_context(created.id, ttl_seconds=7200)
    await client.delete_context(created.id)

    assert created.state == "READY" and read == created and read.display_name == "library"
    assert longer.expire_time is not None
    assert longer.expire_time - datetime.now(UTC) > timedelta(seconds=7000)
    with pytest.raises(NotFoundError) as gone:
        await client.get_context(created.id)
    assert gone.value.status == 404 and gone.value.request_id


async def test_wait_until_ready(client: AsyncClient) -> None:
    text = " ".join(f"Room {i} keeps paintings of rivers and boats." for i in range(40))
    pending = await client.create_context(text, wait=False)
    assert pending.state == "PROCESSING"

    with pytest.raises(WaitTimeoutError):
        await client.wait_until_ready(pending, timeout=0)
    seen: list[str] = []
    ready = await client.wait_until_ready(
        pending.id, timeout=60, poll_interval=0.01, on_progress=lambda c: seen.append(c.state)
    )
    assert ready.state == "READY" and seen[-1] == "READY"


async def test_pagination_one_page_and_every_page(live: Live) -> None:
    async with AsyncClient(live.url, PAGES_KEYS["async"]) as client:
        ids = [(await client.create_context(f"Letter {i} of the archive.")).id for i in range(3)]
        first = await client.list_contexts(page_size=2)
        second = await client.list_contexts(page_size=2, page_token=first.next_page_token)
        every = [context.id async for context in client.iter_contexts(page_size=1)]

    assert [c.id for c in first.contexts] == ids[:2] and first.next_page_token
    assert [c.id for c in second.contexts] == ids[2:] and second.next_page_token is None
    assert every == ids


async def test_query_and_its_stream_agree(client: AsyncClient, context_id: str) -> None:
    answer = await client.query(context_id, QUESTION, max_new_tokens=12)
    async with await client.stream_query(context_id, QUESTION, max_new_tokens=12) as stream:
        deltas = [delta async for delta in stream]

    assert len(deltas) > 1 and "".join(deltas) == answer.answer == stream.result.answer
    assert stream.result.usage == answer.usage
    assert answer.usage.prompt_tokens_details.cached_tokens > 100

    with pytest.raises(NotFoundError):
        await client.stream_query(UNKNOWN_ID, QUESTION)
    async with await client.stream_query(context_id, QUESTION, max_new_tokens=200) as early:
        async for _ in early:
            break
    assert early.response.is_closed


async def test_openai_chat_and_its_stream(client: AsyncClient, context_id: str) -> None:
    native = await client.query(context_id, QUESTION, max_new_tokens=10)
    messages = [{"role": "user", "content": QUESTION}]
    (model,) = await client.list_models()
    completion = await client.chat(context_id, messages, max_tokens=10, model=model.id)
    async with await client.stream_chat(context_id, messages, max_tokens=10) as stream:
        text = "".join([delta async for delta in stream])

    assert completion.text == native.answer == text == stream.result.text
    assert completion.usage == native.usage == stream.result.usage
    assert stream.result.model == model.id


async def test_health_readiness_and_metrics(client: AsyncClient) -> None:
    assert await client.health() == "ok"
    assert await client.ready() is True
    assert "kvzip_time_to_first_token_seconds" in await client.metrics()


async def test_errors_and_retries(live: Live, limited: Live, context_id: str) -> None:
    async with AsyncClient(live.url, KEY) as client:
        with pytest.raises(InvalidRequestError) as invalid:
            await client.query(context_id, QUESTION, temperature=5.0)
    assert invalid.value.status == 422 and "temperature" in invalid.value.message
    async with AsyncClient(live.url) as anonymous:
        with pytest.raises(UnauthorizedError):
            await anonymous.list_contexts()

    async with AsyncClient(limited.url) as hasty:
        with pytest.raises(RateLimitedError) as refused:  # the burst, then one too many
            for _ in range(RATE_BURST + 1):
                await hasty.list_contexts()
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    async with AsyncClient(limited.url, max_retries=3) as patient:
        assert (await patient.list_contexts()).contexts == []

    async with AsyncClient("http://127.0.0.1:9") as nowhere:
        with pytest.raises(APIConnectionError):
            await nowhere.health()
