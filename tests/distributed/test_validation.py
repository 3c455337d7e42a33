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


def test_the_distributed_http_api_answers_422_for_bad_sampling_before_any_job() -> None:
    """Through HTTP in distributed mode (no worker needed: the checks run first)."""
    from uuid import uuid4

    import redis
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    prefix = f"kvzip-test:{uuid4().hex}:"
    settings = Settings(
        mode="distributed", redis_url="redis://127.0.0.1:6379/0", redis_prefix=prefix,
        max_new_tokens_limit=64,
    )  # fmt: skip
    bad = [{"top_p": 0}, {"top_p": 1.5}, {"temperature": -1}, {"max_new_tokens": 0},
           {"max_new_tokens": 65}, {"top_p": "NaN"}]  # fmt: skip
    client_redis = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5)
    try:
        with TestClient(create_app(settings)) as client:
            for fields in bad:
                body = {"question": "What is the key?", **fields}
                response = client.post(f"/contexts/ctx_{'0' * 32}/query", json=body)
                assert response.status_code == 422, (fields, response.text)
                assert response.json()["error"]["code"] == "invalid_request"
        keys = list(client_redis.scan_iter(match=f"{prefix}*"))
        assert not [k for k in keys if b"jobs" in k], keys  # no job stream was written
    finally:
        for key in client_redis.scan_iter(match=f"{prefix}*"):
            client_redis.delete(key)
        client_redis.close()
