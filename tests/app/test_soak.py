"""The bounded load test (bench/serve/soak.py), shortened: 64 concurrent streams for 10 s
against `python -m app` over the tiny model, with a small queue, KV budget and rate limit.
Only 200 streams and 429/503 refusals with Retry-After, no request at its deadline, the
server ready afterwards and its RSS bounded. Plus the verdict itself on made-up runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.serve.soak import SoakResult, judge, parse_args, soak


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_64_streams_get_answers_or_refusals_and_memory_stays_bounded(
    tiny_model_dir: Path,
) -> None:
    args = parse_args(["--duration", "10", "--warmup", "2", "--new-tokens", "8", "--contexts", "2"])

    result = soak(args, tiny_model_dir)

    assert result.held, result.problems
    assert result.summary["concurrency"] == 64
    assert result.outcomes["200"] > 0
    assert result.outcomes.get("503", 0) + result.outcomes.get("429", 0) > 0  # it did refuse
    assert set(result.outcomes) <= {"200", "429", "503"}
    assert result.rss_mib["growth"] < args.rss_growth_limit_mib


def made_up(outcomes: dict[str, int], **changes: Any) -> tuple[SoakResult, list[dict[str, Any]]]:
    records = [
        {"error": None if kind == "200" else kind, "e2e_s": 0.5, "retry_after": "1"}
        for kind, n in outcomes.items()
        for _ in range(n)
    ]
    fields: dict[str, Any] = {
        "settings": {},
        "summary": {},
        "outcomes": outcomes,
        "refusals_without_retry_after": 0,
        "rss_mib": {"start": 500.0, "end": 510.0, "max": 520.0, "growth": 10.0},
        "ready_after": True,
        **changes,
    }
    return SoakResult(**fields), records


@pytest.mark.parametrize(
    ("outcomes", "changes", "problem"),
    [
        ({"200": 5, "503": 3, "429": 1}, {}, None),
        ({"200": 5, "500": 1}, {}, "outcomes other than 200/429/503"),
        ({"200": 5, "stream:truncated": 1}, {}, "outcomes other than 200/429/503"),
        ({"200": 5, "TimeoutError": 1}, {}, "outcomes other than 200/429/503"),
        ({"200": 5, "503": 2}, {"refusals_without_retry_after": 2}, "without Retry-After"),
        ({"200": 5}, {"ready_after": False}, "not ready"),
        ({"200": 5}, {"rss_mib": {"start": 1.0, "end": 99.0, "max": 99.0, "growth": 98.0}}, "RSS"),
        ({"503": 5}, {}, "no request was answered"),
    ],
)
def test_the_verdict_names_what_did_not_hold(
    outcomes: dict[str, int], changes: dict[str, Any], problem: str | None
) -> None:
    result, records = made_up(outcomes, **changes)

    judge(result, records, parse_args([]))

    if problem is None:
        assert result.held, result.problems
    else:
        assert any(problem in text for text in result.problems), result.problems


def test_a_request_at_its_deadline_fails_the_run() -> None:
    result, records = made_up({"200": 3})
    records[0]["e2e_s"] = 60.0

    judge(result, records, parse_args(["--request-timeout", "60"]))

    assert result.problems == ["1 requests reached their 60.0 s deadline"]
