"""The server's default quantization (KVZIP_DEFAULT_QUANTIZATION) in distributed mode: the
API resolves a left-out `compression.quantization` to the default before it computes the
context id and enqueues the job, so it has the id of a registration naming the default."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from service.config import CompressionConfig
from service.serving.distributed.jobs import IngestJob
from service.serving.distributed.stream_worker import Progress
from service.serving.records import ContextRecord
from tests.distributed.distributed_testing import REDIS_URL, Cluster, FakeExecutor
from tests.storage.storage_testing import RedisEnv

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

TEXT = "The lighthouse keeper wrote the pass key 48213 on the wall of the lamp room."


@dataclass
class RecordingExecutor(FakeExecutor):
    """The fake executor, noting the compression each ingest job carried."""

    compressions: dict[str, CompressionConfig] = field(default_factory=dict)

    async def ingest(
        self, job: IngestJob, progress: Progress, registered: ContextRecord | None = None
    ) -> tuple[ContextRecord, tuple[str, ...]]:
        self.compressions[job.context_id] = job.compression
        return await super().ingest(job, progress, registered)


async def _register(
    cluster: Cluster, settings: Settings, compressions: list[dict[str, object] | None]
) -> list[str]:
    """The ids the HTTP API gives TEXT registered with each of `compressions`."""
    app = create_app(settings, service=cluster.api)
    app.state.service = cluster.api  # started by the Cluster: no lifespan here
    ids = []
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for compression in compressions:
                body: dict[str, object] = {"text": TEXT}
                if compression is not None:
                    body["compression"] = compression
                response = await client.post("/contexts", json=body, timeout=20)
                assert response.status_code in (200, 201), response.text
                ids.append(response.json()["id"])
    finally:  # what the lifespan would close
        await app.state.rate_limiter.aclose()
        await app.state.auth_failures.aclose()
    return ids


def _settings(redis_env: RedisEnv, **overrides: object) -> Settings:
    return Settings(
        mode="distributed",
        redis_url=REDIS_URL,
        redis_prefix=redis_env.prefix,
        **overrides,  # type: ignore[arg-type]
    )


async def test_left_out_quantization_is_the_default_and_has_its_id(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        executor = RecordingExecutor()
        await cluster.start_worker("w1", executor)
        omitted, partial, null, explicit, unquantized = await _register(
            cluster,
            _settings(redis_env),
            [None, {"ratio": 0.3}, {"quantization": None}, {"quantization": "fp8"},
             {"quantization": "none"}],
        )  # fmt: skip

    assert omitted == partial == null == explicit
    assert unquantized != omitted
    assert executor.compressions[omitted].quantization == "fp8"
    assert executor.compressions[unquantized].quantization == "none"
    assert len(executor.ingested) == 2  # the same id: registered once


async def test_the_operator_chooses_the_default(redis_env: RedisEnv) -> None:
    async with Cluster(redis_env) as cluster:
        executor = RecordingExecutor()
        await cluster.start_worker("w1", executor)
        [omitted] = await _register(
            cluster, _settings(redis_env, default_quantization="int4"), [None]
        )
        [named] = await _register(cluster, _settings(redis_env), [{"quantization": "int4"}])

    assert named == omitted  # the id hashes the resolved quantization
    assert executor.compressions[omitted].quantization == "int4"
