"""Counts from a Schemathesis run: generated cases per operation and responses per input class.

`st run --report ndjson` writes one event per line; each finished scenario carries its
recorder: the cases (method, path template, phase, generation mode and the description of
what was generated) and the interaction (the response) of each. `summarise` folds them into
`Counts`; `markdown` renders the tables that docs/reliability.md quotes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Counts", "input_class", "markdown", "summarise"]

FIELD_NAME = re.compile(r"'[A-Za-z_][A-Za-z0-9_]*'")
"""A quoted field name in a description (`... and 'top_p'`): the class leaves it out."""


@dataclass
class Counts:
    """Cases by operation (`POST /contexts`) and status, and by input class and status."""

    operations: Counter[str] = field(default_factory=Counter)
    by_operation: Counter[tuple[str, int | None]] = field(default_factory=Counter)
    by_class: Counter[tuple[str, int | None]] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.operations.values())

    def statuses(self) -> Counter[int | None]:
        result: Counter[int | None] = Counter()
        for (_, status), count in self.by_operation.items():
            result[status] += count
        return result

    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses().items() if status is None or status >= 500)


def input_class(mode: str, description: str | None) -> str:
    """What kind of input a case was, without the field it was aimed at:
    `stop -> Array with invalid items: String larger than maxLength` is
    `negative: String larger than maxLength`, `Unspecified HTTP method: TRACE` is
    `negative: Unspecified HTTP method`; fuzzing's `violates ...` lines are one class."""
    text = (description or "").strip()
    if "violates `" in text:
        return f"{mode}: random values that violate the schema"
    segments = [part for chunk in text.split(" -> ") for part in chunk.split(": ")]
    named = [part for part in segments if part[:1].isupper() and " " in part]
    text = FIELD_NAME.sub("<field>", named[-1] if named else text or "Unlabelled")
    return f"{mode}: {text}"


def _cases(events: Iterable[dict[str, Any]]) -> Iterable[tuple[dict[str, Any], int | None]]:
    for event in events:
        recorder = event.get("ScenarioFinished", {}).get("recorder") or {}
        interactions = recorder.get("interactions", {})
        for case_id, case in recorder.get("cases", {}).items():
            response = (interactions.get(case_id) or {}).get("response")
            yield case["value"], (response or {}).get("status_code")


def summarise(ndjson: Path, documented: set[str]) -> Counts:
    """Fold the events in `ndjson`; a method the schema does not document on a path counts
    under `<undocumented method> path`."""
    counts = Counts()
    if not ndjson.exists():  # st stopped before testing (a bad option, a bad config)
        return counts
    lines = ndjson.read_text(encoding="utf-8").splitlines()
    for case, status in _cases(json.loads(line) for line in lines if line.strip()):
        operation = f"{case['method']} {case['path']}"
        if operation not in documented:
            operation = f"<undocumented method> {case['path']}"
        meta = case.get("meta") or {}
        phase = meta.get("phase") or {}
        description = (phase.get("data") or {}).get("description")
        mode = (meta.get("generation") or {}).get("mode", "positive")
        counts.operations[operation] += 1
        counts.by_operation[operation, status] += 1
        counts.by_class[input_class(mode, description), status] += 1
    return counts


def _statuses(counter: Counter[tuple[str, int | None]], key: str) -> str:
    found = sorted(
        ((status, n) for (name, status), n in counter.items() if name == key),
        key=lambda item: (item[0] is None, item[0] or 0),
    )
    return ", ".join(f"{'none' if status is None else status}: {n}" for status, n in found)


def markdown(counts: Counts) -> str:
    """Two tables: cases per operation, then responses per input class (most cases first)."""
    rows = ["| Operation | Cases | Responses |", "|---|---:|---|"]
    for operation, n in sorted(counts.operations.items()):
        rows.append(f"| `{operation}` | {n} | {_statuses(counts.by_operation, operation)} |")
    errors = counts.server_errors()
    rows.append(f"| **total** | **{counts.total}** | 5xx or no response: {errors} |")
    classes: Counter[str] = Counter()
    for (name, _), n in counts.by_class.items():
        classes[name] += n
    rows += ["", "| Input class (Schemathesis) | Cases | Responses |", "|---|---:|---|"]
    for name, n in classes.most_common():
        rows.append(f"| {name} | {n} | {_statuses(counts.by_class, name)} |")
    return "\n".join(rows) + "\n"
