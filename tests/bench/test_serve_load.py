"""bench/serve: the load generator against the real app under uvicorn, on the tiny model."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.serve.load import RequestRecord, Scenario, run_scenario
from bench.serve.server import serving

SUMMARY_FIELDS = {
    "name",
    "kind",
    "mode",
    "concurrency",
    "rate",
    "contexts",
    "requests",
    "ok",
    "errors",
    "wall_s",
    "output_tokens",
    "output_tokens_per_s",
    "requests_per_s",
    "ttft_s",
    "itl_s",
    "e2e_s",
    "server_ttft_s",
}


@pytest.fixture
def base_url(tiny_engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from app.main import create_app
    from app.settings import Settings
    from service.serving.embedded import build_embedded_service

    for name in list(os.environ):
        if name.startswith("KVZIP_"):
            monkeypatch.delenv(name)
    settings = Settings(data_dir=tmp_path, log_level="warning")
    service = build_embedded_service(settings.to_service_config(), engine=tiny_engine)
    with serving(create_app(settings, service=service), start_timeout_s=60) as url:
        yield url


def register(base_url: str, texts: list[str]) -> list[str]:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        return [
            client.post("/contexts", json={"text": t}).raise_for_status().json()["id"]
            for t in texts
        ]


def test_concurrent_load_reports_every_field_and_no_errors(base_url: str) -> None:
    ids = register(base_url, [f"Document {i}: the pass key is {4821 + i}. " * 20 for i in (0, 1)])
    scenario = Scenario(
        "c2-different",
        tuple(ids),
        concurrency=2,
        duration_s=2.0,
        new_tokens=6,
        request_timeout_s=30,
        drain_timeout_s=30,
    )
    run = asyncio.run(asyncio.wait_for(run_scenario(base_url, scenario), timeout=90))
    summary, records = run["summary"], run["records"]
    assert set(summary) >= SUMMARY_FIELDS
    assert summary["errors"] == {}
    assert summary["requests"] == summary["ok"] == len(records) >= 2
    assert {r["context_id"] for r in records} == set(ids)  # round-robin over both contexts
    assert summary["output_tokens"] == sum(r["completion_tokens"] for r in records) > 0
    assert summary["output_tokens_per_s"] > 0
    for key in ("ttft_s", "e2e_s"):
        assert 0 < summary[key]["p50"] <= summary[key]["p99"]
    for r in records:
        assert r["status"] == 200 and 1 <= r["completion_tokens"] <= 6
        assert 0 < r["ttft_s"] <= r["e2e_s"]


def test_a_missing_context_is_counted_by_status(base_url: str) -> None:
    scenario = Scenario(
        "missing",
        ("ctx_" + "0" * 32,),
        concurrency=1,
        requests=2,
        new_tokens=2,
        request_timeout_s=30,
        drain_timeout_s=30,
    )
    run = asyncio.run(asyncio.wait_for(run_scenario(base_url, scenario), timeout=60))
    assert run["summary"]["errors"] == {"404": 2}
    assert run["summary"]["ok"] == 0 and run["summary"]["ttft_s"]["p50"] is None


def test_open_loop_poisson_arrivals_are_seeded_and_bounded(base_url: str) -> None:
    ids = register(base_url, ["A short document about nothing in particular. " * 10])
    scenario = Scenario(
        "poisson",
        tuple(ids),
        rate=4.0,
        duration_s=1.0,
        new_tokens=2,
        request_timeout_s=30,
        drain_timeout_s=30,
    )
    run = asyncio.run(asyncio.wait_for(run_scenario(base_url, scenario), timeout=60))
    starts = [r["start_s"] for r in run["records"]]
    assert run["summary"]["errors"] == {} and run["summary"]["mode"] == "poisson"
    assert all(s < 1.0 + 0.5 for s in starts) and starts == sorted(starts)


def test_itl_divides_gaps_by_the_tokens_each_delta_carried() -> None:
    record = RequestRecord(
        index=0, context_id="c", start_s=0.0, completion_tokens=5, delta_times_s=[0.1, 0.3, 0.5]
    )
    # 2 gaps carrying 4 token intervals: each gap is 2 tokens' worth
    assert record.itl_samples() == pytest.approx([0.1, 0.1])
    assert RequestRecord(index=0, context_id="c", start_s=0.0).itl_samples() == []


def test_a_scenario_needs_one_arrival_mode() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Scenario("bad", ("c",), concurrency=2, rate=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        Scenario("bad", ("c",))
