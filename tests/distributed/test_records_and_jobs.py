"""Context records in Redis (transitions at most once, TTL with the context) and the job and
reply encodings (JSON round trips, domain errors rebuilt as the same class)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from service.config import CompressionConfig
from service.errors import (
    ContextNotFoundError,
    DocumentTooLongError,
    QuestionTooLongError,
    QueueFullError,
)
from service.serving.distributed.jobs import (
    RESULT,
    IngestJob,
    MalformedJobError,
    QueryJob,
    Reply,
    decode_job,
    encode_job,
    error_from_payload,
    error_payload,
)
from service.serving.distributed.keys import RedisKeys
from service.serving.distributed.redis_records import RecordStore
from service.serving.distributed.remote_record import RemoteRecord
from service.serving.records import ContextRecord
from service.types import QueryRequest, QueryResult, QueryTimings, SamplingParams, Turn
from tests.storage.storage_testing import RedisEnv


def processing(cid: str = "ctx_" + "a" * 32, ttl_s: float = 600.0) -> RemoteRecord:
    now = datetime.now(UTC)
    record = ContextRecord(
        id=cid,
        tenant="",
        display_name="doc",
        model="m",
        state="PROCESSING",
        create_time=now.isoformat(),
        context_tokens=0,
        prefix_tokens=0,
        method="kvzip",
        ratio=0.3,
        chunk_size=2000,
        kept_kv_pairs=0,
        total_kv_pairs=0,
        bytes=0,
        expire_time=(now + timedelta(seconds=ttl_s)).isoformat(),
        progress=0.0,
    )
    return RemoteRecord(record)


@pytest.mark.redis
async def test_concurrent_finishers_make_a_context_ready_exactly_once(
    redis_env: RedisEnv,
) -> None:
    store = RecordStore(redis_env.client, RedisKeys(redis_env.prefix))
    new = processing()
    assert (await store.create(new))[1]
    assert not (await store.create(new))[1]  # a live record is never replaced
    ready = replace(new.record, state="READY", kept_kv_pairs=30, total_kv_pairs=100, bytes=9)
    results = await asyncio.gather(
        *(store.mark_ready(new.id, ready, ("disk",), f"w{i}") for i in range(6))
    )
    assert sorted(results) == [False] * 5 + [True]
    stored = await store.get(new.id)
    assert stored is not None and stored.state == "READY" and stored.tiers == ("disk",)
    assert stored.record.create_time == new.record.create_time
    assert stored.record.expire_time == new.record.expire_time
    assert await redis_env.client.xlen(store.keys.events) == 1
    assert not await store.mark_failed(new.id, {"message": "late"}, "w9")  # READY stays


@pytest.mark.redis
async def test_the_record_key_lives_as_long_as_the_context(redis_env: RedisEnv) -> None:
    store = RecordStore(redis_env.client, RedisKeys(redis_env.prefix))
    new = processing(ttl_s=600)
    await store.create(new)
    assert 590_000 < await redis_env.client.pttl(store.keys.context(new.id)) <= 600_000
    await store.set_progress(new.id, 0.5)  # other changes keep the TTL
    assert 590_000 < await redis_env.client.pttl(store.keys.context(new.id)) <= 600_000
    later = datetime.now(UTC) + timedelta(hours=1)
    assert await store.set_expiry(new.id, later, "")
    assert 3_590_000 < await redis_env.client.pttl(store.keys.context(new.id)) <= 3_600_000
    assert not await store.set_expiry(new.id, later, "someone-else")


@pytest.mark.redis
async def test_a_failed_record_is_replaced_by_a_new_registration(redis_env: RedisEnv) -> None:
    store = RecordStore(redis_env.client, RedisKeys(redis_env.prefix))
    new = processing()
    await store.create(new)
    assert await store.mark_failed(new.id, error_payload(QueueFullError(2.0)), "w1")
    failed = await store.get(new.id)
    assert failed is not None and failed.state == "FAILED"
    assert failed.record.error == "the work queue is full, retry later"
    assert (await store.create(new))[1]


def test_jobs_round_trip() -> None:
    ingest = IngestJob("ctx_1", "acme", "text", CompressionConfig("snapkv", 0.2, 64), "d", "sys")
    assert decode_job({k.encode(): v.encode() for k, v in encode_job(ingest).items()}) == ingest
    request = QueryRequest(
        "Why?",
        SamplingParams(9, 0.7, 0.9, 3, ("\\n", "END")),
        tenant="acme",
        ratio=0.1,
        instructions="Answer in one word.",
        history=(Turn("user", "Who?"), Turn("assistant", "Ada.")),
    )
    query = QueryJob("req", "ctx_1", request, 123.5)
    assert decode_job({k.encode(): v.encode() for k, v in encode_job(query).items()}) == query
    with pytest.raises(MalformedJobError):
        decode_job({b"kind": b"ingest", b"body": b"{}"})
    with pytest.raises(MalformedJobError):
        decode_job({b"kind": b"compile", b"body": b"{}"})


def test_domain_errors_travel_as_themselves() -> None:
    for error in (
        DocumentTooLongError(5000, 3712),
        QuestionTooLongError(900, 300),
        ContextNotFoundError("ctx_1"),
    ):
        rebuilt = error_from_payload(error_payload(error))
        assert type(rebuilt) is type(error) and str(rebuilt) == str(error)
        assert vars(rebuilt) == vars(error)


def test_replies_round_trip() -> None:
    result = QueryResult("48213", 120, 3, 100, QueryTimings(0.1, 0.2, 0.3), "length")
    reply = Reply(RESULT, "w1:abc", result=result)
    assert Reply.decode({k.encode(): v.encode() for k, v in reply.encode().items()}) == reply
