"""The distributed API runs the shared validation before any job exists (the same checks as
the embedded service, service.serving.validation)."""

from __future__ import annotations

import pytest

from service.errors import InvalidInputError
from service.serving.distributed.jobs import INGEST, QUERY
from service.types import CreateContextRequest, QueryRequest, SamplingParams
from tests.distributed.distributed_testing import Cluster, FakeExecutor
from tests.storage.storage_testing import RedisEnv

pytestmark = pytest.mark.redis

BAD_SAMPLING = [
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(top_p=float("nan")), "top_p"),
    (SamplingParams(temperature=-1.0), "temperature"),
    (SamplingParams(temperature=float("inf")), "temperature"),
    (SamplingParams(max_new_tokens=0), "max_new_tokens"),
    (SamplingParams(max_new_tokens=10**6), "max_new_tokens"),
]


async def test_bad_sampling_is_refused_before_any_query_job(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        info, _ = await cluster.api.create_context(CreateContextRequest("The key is 48213."))
        for sampling, field in BAD_SAMPLING:
            with pytest.raises(InvalidInputError, match=field):
                await cluster.api.query(info.id, QueryRequest("Key?", sampling))
            with pytest.raises(InvalidInputError, match=field):
                stream = cluster.api.stream_query(info.id, QueryRequest("Key?", sampling))
                await anext(aiter(stream))
        with pytest.raises(InvalidInputError, match="ratio"):
            await cluster.api.query(info.id, QueryRequest("Key?", ratio=float("nan")))
        assert await redis_env.client.xlen(cluster.keys.stream(QUERY)) == 0


async def test_bad_registrations_are_refused_before_any_ingest_job(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        await cluster.start_worker("w1", FakeExecutor())
        for request, field in [
            (CreateContextRequest("doc", ttl_seconds=float("nan")), "ttl_seconds"),
            (CreateContextRequest("doc", tenant="*"), "tenant"),
            (CreateContextRequest(" \n\t "), "text"),
        ]:
            with pytest.raises(InvalidInputError, match=field):
                await cluster.api.create_context(request)
        assert await redis_env.client.xlen(cluster.keys.stream(INGEST)) == 0
