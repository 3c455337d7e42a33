"""The tools of `make schemathesis`: the hostile probes get their documented 4xx from the
app (over the test double, in seconds), and st's events fold into the tables of
docs/reliability.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.main import create_app
from app.settings import ENV_PREFIX, Settings
from tests.app.conftest import FakeContextService, serving
from tests.fuzz.probes import probes, run_probes
from tests.fuzz.report import input_class, markdown, summarise


@pytest.mark.timeout(120)
def test_every_probe_gets_its_documented_status(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    with serving(create_app(Settings(), FakeContextService())) as url:
        results = run_probes(url, {})

    assert sum(result.statuses.total() for result in results) == len(probes())
    assert [r.input_class for r in results if r.unexpected] == []
    assert all(status < 500 for r in results for status in r.statuses)


@pytest.mark.parametrize(
    ("mode", "description", "expected"),
    [
        ("negative", "stop -> Array with invalid items: String larger than maxLength",
         "negative: String larger than maxLength"),
        ("negative", "Unspecified HTTP method: TRACE", "negative: Unspecified HTTP method"),
        ("negative", "Malformed Content-Type: multipart/form-data without boundary",
         "negative: Malformed Content-Type"),
        ("negative", "messages -> Array with invalid items: Missing required property: role",
         "negative: Missing required property"),
        ("negative", "- violates `type` at /properties/wait\n- violates `anyOf` at /x",
         "negative: random values that violate the schema"),
        ("positive", "Object with all required properties and 'top_p'",
         "positive: Object with all required properties and <field>"),
        ("positive", None, "positive: Unlabelled"),
    ],
)  # fmt: skip
def test_input_class_drops_the_field_and_keeps_the_kind(
    mode: str, description: str | None, expected: str
) -> None:
    assert input_class(mode, description) == expected


def scenario(cases: list[tuple[str, str, str, int | None]]) -> str:
    """One ScenarioFinished event holding `cases` (method, path, mode, status)."""
    recorded, interactions = {}, {}
    for index, (method, path, mode, status) in enumerate(cases):
        meta = {"generation": {"mode": mode}, "phase": {"name": "fuzzing", "data": None}}
        recorded[f"c{index}"] = {"value": {"method": method, "path": path, "meta": meta}}
        response = None if status is None else {"status_code": status}
        interactions[f"c{index}"] = {"response": response}
    recorder = {"label": "x", "cases": recorded, "interactions": interactions}
    return json.dumps({"ScenarioFinished": {"recorder": recorder}})


def test_summarise_counts_cases_per_operation_and_server_errors(tmp_path: Path) -> None:
    events = tmp_path / "events.ndjson"
    post, health = ("POST", "/contexts"), ("GET", "/healthz")
    lines = [
        json.dumps({"Initialize": {}}),
        scenario([(*post, "positive", 201), (*health, "negative", 200)]),
        scenario([(*post, "negative", 422), ("TRACE", "/healthz", "negative", 405)]),
        scenario([(*post, "positive", 500), (*post, "positive", None)]),
        json.dumps({"ScenarioFinished": {"recorder": {"label": "skipped"}}}),
    ]
    events.write_text("\n".join(lines))

    counts = summarise(events, {"POST /contexts", "GET /healthz"})

    assert counts.total == 6
    assert counts.operations == {
        "POST /contexts": 4,
        "GET /healthz": 1,
        "<undocumented method> /healthz": 1,
    }
    assert counts.server_errors() == 2  # the 500 and the case without a response
    assert "| **total** | **6** | 5xx or no response: 2 |" in markdown(counts)
    assert summarise(tmp_path / "absent.ndjson", set()).total == 0
