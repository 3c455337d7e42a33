"""Distributed mode as deployed: worker processes (`python -m app.cli worker`, tiny model) and
API processes (uvicorn, no model) joined by the real Redis, on a test prefix.

Two APIs + two workers register 20 documents at once (all READY once, none lost or doubled,
every question answered); each worker's metrics endpoint shows its engine series move after
an ingest and a query; a flushed Redis tier is refilled from the shared disk. (Workers
killed, hung or racing, and Redis losing its data: the fault suite, tests/faults.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.distributed.metrics_testing import scrape
from tests.distributed.processes_testing import QUESTION, Deployment, deployed, document

# Its own deadline: the first test here also waits for 4 processes to start (~25 s).
pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def deployment(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("deployment")
    with deployed(tiny_model_dir, tmp, workers=["w1", "w2"], apis=["api1", "api2"]) as running:
        yield running


async def test_twenty_documents_through_two_apis_and_two_workers(deployment: Deployment) -> None:
    api1, api2 = deployment.apis
    docs = [document(i) for i in range(20)]
    with deployment.explained():
        await register_and_ask(deployment, api1, api2, docs)


async def register_and_ask(deployment: Deployment, api1: str, api2: str, docs: list[str]) -> None:
    async with httpx.AsyncClient(timeout=120.0) as http:
        created = await asyncio.gather(
            *(
                http.post(f"{(api1, api2)[i % 2]}/contexts", json={"text": d})
                for i, d in enumerate(docs)
            )
        )
        assert [r.status_code for r in created] == [201] * 20, [r.text for r in created]
        ids = [r.json()["id"] for r in created]
        assert len(set(ids)) == 20, "two documents got one id"
        assert {r.json()["state"] for r in created} == {"READY"}
        again = await asyncio.gather(
            *(
                http.post(f"{(api2, api1)[i % 2]}/contexts", json={"text": d})
                for i, d in enumerate(docs)
            )
        )
        assert [r.status_code for r in again] == [200] * 20
        assert [r.json()["id"] for r in again] == ids
        assert sorted(deployment.ready_events()) == sorted(ids)  # 0 lost, 0 duplicated
        listed = (await http.get(f"{api2}/contexts", params={"page_size": 100})).json()
        assert sorted(c["id"] for c in listed["contexts"]) == sorted(ids)
        answers = await asyncio.gather(
            *(
                http.post(f"{(api1, api2)[i % 2]}/contexts/{cid}/query", json=QUESTION)
                for i, cid in enumerate(ids)
            )
        )
        assert [r.status_code for r in answers] == [200] * 20, [r.text for r in answers]
        for response in answers:
            body = response.json()
            assert isinstance(body["answer"], str)
            assert 1 <= body["usage"]["completion_tokens"] <= 8
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    workers = {deployment.record(cid)["worker"] for cid in ids}
    assert workers == {"w1", "w2"}, workers  # the work was spread over both


async def test_workers_serve_their_engine_metrics(deployment: Deployment) -> None:
    api1, api2 = deployment.apis
    before, api_before = scrape(*deployment.live_metrics()), scrape(f"{api2}/metrics")
    with deployment.explained():
        async with httpx.AsyncClient(timeout=60.0) as http:
            created = await http.post(f"{api1}/contexts", json={"text": document(500)})
            assert created.status_code == 201, created.text
            answer = await http.post(f"{api2}/contexts/{created.json()['id']}/query", json=QUESTION)
            assert answer.status_code == 200, answer.text
    grew = [  # summed over the workers: which one took which job does not matter
        'kvzip_ingest_phase_seconds_count{phase="scoring"}',
        'kvzip_ingest_phase_seconds_count{phase="store"}',
        'kvzip_ingests_total{outcome="ready"}',
        'kvzip_worker_jobs_claimed_total{kind="ingest"}',
        'kvzip_worker_jobs_claimed_total{kind="query"}',
        'kvzip_worker_jobs_completed_total{kind="ingest"}',
        'kvzip_worker_jobs_completed_total{kind="query"}',
        'kvzip_tier_misses_total{tier="resident"}',  # KVZIP_MEMORY_CACHE_BYTES=0
        "kvzip_context_tokens_sum",
        "kvzip_generation_tokens_total",
        "kvzip_decode_step_seconds_count",
        "kvzip_decode_batch_rows_count",
    ]
    deadline = time.monotonic() + 15  # a job is counted just after its reply is sent
    after = scrape(*deployment.live_metrics())
    while short := [k for k in grew if after[k] <= before[k]]:
        assert time.monotonic() < deadline, f"did not grow: {short}\n{deployment.diagnostics()}"
        await asyncio.sleep(0.2)
        after = scrape(*deployment.live_metrics())
    assert after['kvzip_tier_bytes{tier="disk"}'] > 0
    stored = [f'kvzip_tier_hits_total{{tier="{t}"}}' for t in ("redis", "disk")]
    assert sum(after[k] - before[k] for k in stored) >= 1  # the query read the stored blob
    for url in deployment.live_metrics():
        own = scrape(url)
        assert time.time() - own["kvzip_worker_heartbeat_timestamp_seconds"] < 10, url
        assert not any(k.startswith("kvzip_http_") for k in own), "HTTP series on a worker"
    api_after = scrape(f"{api2}/metrics")
    ttft = "kvzip_time_to_first_token_seconds_count"
    assert api_after[ttft] == api_before[ttft] + 1
    assert api_after["kvzip_workers_live"] == len(deployment.live_metrics())


async def test_a_flushed_cache_tier_still_answers_and_is_refilled(deployment: Deployment) -> None:
    api1, api2 = deployment.apis
    async with httpx.AsyncClient(timeout=60.0) as http:
        created = await http.post(f"{api1}/contexts", json={"text": document(99)})
        cid = created.json()["id"]
        blobs = list(deployment.cache.scan_iter(match=deployment.key(f"blob:{cid}*")))
        assert blobs, "the Redis tier holds no copy"
        assert not list(deployment.redis.scan_iter(match=deployment.key("blob:*")))
        deployment.cache.unlink(*blobs)  # FLUSH of the cache tier
        answer = await http.post(f"{api2}/contexts/{cid}/query", json=QUESTION)
        assert answer.status_code == 200, answer.text
    refilled = list(deployment.cache.scan_iter(match=deployment.key(f"blob:{cid}*")))
    assert sorted(refilled) == sorted(blobs)  # disk served it and promoted it back
    assert all(deployment.cache.pttl(k) > 0 for k in refilled)
