"""Hostile inputs that a schema-driven fuzzer does not write, sent to the live server after
Schemathesis: the classes of issue 13 items 2-4 (unbounded stop lists, non-finite numbers,
huge or forged page tokens) and a few more (deep nesting, lone surrogates, an oversized
body, huge echoes). Each must be refused with its documented 4xx.

    rows = run_probes(base_url, headers)   # [(input class, probes, statuses, unexpected)]
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["ProbeResult", "markdown", "probes", "register", "run_probes"]

DOC = "The pass key is 48213. Remember it."
NON_FINITE = ("1e400", "-1e400", "NaN", "Infinity", "-Infinity")
CHAT = '"model": "{model}", "context_id": "{id}", "messages": [{"role": "user", "content": "q"}]'
NUMBER = "__N__"
NUMERIC_FIELDS = {
    # (method, path): bodies, NUMBER standing for the bare number token
    ("POST", "/contexts"): [
        '{"text": "x", "ttl_seconds": __N__}',
        '{"text": "x", "compression": {"ratio": __N__}}',
        '{"text": "x", "compression": {"method": "kvzap", "threshold": __N__}}',
    ],
    ("POST", "/contexts/{id}/query"): [
        f'{{"question": "q", "{name}": {NUMBER}}}'
        for name in ("max_new_tokens", "temperature", "ratio", "top_p", "seed")
    ],
    ("PATCH", "/contexts/{id}"): ['{"ttl_seconds": __N__}'],
    ("POST", "/v1/chat/completions"): [
        f'{{{CHAT}, "{name}": {NUMBER}}}'
        for name in ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n")
    ],
}
CID = "ctx_" + "ab" * 16
FORGED_TOKENS = {
    "huge integer": f'[{"9" * 330}, "{CID}"]',
    "overflowing float": f'[1e400, "{CID}"]',
    "NaN stamp, bad id": '[NaN, "a"]',
    "nested": "[" * 100 + "]" * 100,
    "object": "{}",
}


@dataclass(frozen=True)
class Probe:
    input_class: str
    method: str
    path: str  # `{id}`: a registered context
    body: bytes | None = None
    params: tuple[tuple[str, str], ...] = ()
    expected: frozenset[int] = frozenset({422})


@dataclass
class ProbeResult:
    input_class: str
    statuses: Counter[int]
    expected: frozenset[int]

    @property
    def unexpected(self) -> int:
        return sum(n for status, n in self.statuses.items() if status not in self.expected)


def _chat(extra: str) -> bytes:
    return ("{" + CHAT + ", " + extra + "}").encode()


def _query(extra: str) -> bytes:
    return ('{"question": "q", ' + extra + "}").encode()


QUERY_PATH = "/contexts/{id}/query"
CHAT_PATH = "/v1/chat/completions"
REFUSED = frozenset({400, 422})


def _stop_probes() -> Iterator[Probe]:
    label = "stop: a list of 10,000 strings (issue 13 item 2)"
    many = json.dumps(["x"] * 10_000)
    yield Probe(label, "POST", CHAT_PATH, _chat(f'"stop": {many}'))
    yield Probe(label, "POST", QUERY_PATH, _query(f'"stop": {many}'))
    label = "stop: 5 strings, or one of 257 characters"
    for stop in (json.dumps(["x"] * 5), json.dumps("y" * 257), json.dumps(["y" * 257])):
        yield Probe(label, "POST", CHAT_PATH, _chat(f'"stop": {stop}'))
        yield Probe(label, "POST", QUERY_PATH, _query(f'"stop": {stop}'))


def _number_probes() -> Iterator[Probe]:
    label = "non-finite numbers (1e400, -1e400, NaN, ±Infinity) in every numeric field (item 3)"
    for (method, path), templates in NUMERIC_FIELDS.items():
        for template in templates:
            for number in NON_FINITE:
                yield Probe(label, method, path, template.replace(NUMBER, number).encode())


def _token_probes() -> Iterator[Probe]:
    """A forged token is 400; one longer than the schema's 512 characters is 422."""
    label = "page_token: forged (huge integer, 1e400, NaN, nesting) or 60,000 characters (item 4)"
    tokens = [base64.urlsafe_b64encode(raw.encode()).decode() for raw in FORGED_TOKENS.values()]
    for token in [*tokens, "A" * 60_000]:
        yield Probe(label, "GET", "/contexts", params=(("page_token", token),), expected=REFUSED)
    yield Probe(
        "page_size: a 400-digit integer", "GET", "/contexts", params=(("page_size", "9" * 400),)
    )


def _shape_probes() -> Iterator[Probe]:
    nested = b"[" * 100_000 + b"]" * 100_000
    for path in ("/contexts", CHAT_PATH):
        yield Probe("JSON nested 100,000 deep", "POST", path, nested, expected=frozenset({400}))
    label = "lone surrogates (\\ud800) in a value or a field name"
    for path, body in [
        ("/contexts", b'{"text": "a \\ud800 b"}'),
        (QUERY_PATH, b'{"question": "\\ud800"}'),
        ("/contexts", b'{"text": "a", "\\udfff": 1}'),
    ]:
        yield Probe(label, "POST", path, body, expected=REFUSED)
    big = json.dumps({"text": "a" * (17 * 1024 * 1024)}).encode()
    yield Probe(
        "a 17 MiB body (over KVZIP_MAX_BODY_BYTES)",
        "POST",
        "/contexts",
        big,
        expected=frozenset({413}),
    )
    label = "a 100,000-character field name or display_name"
    for body in ({"text": "a", "k" * 100_000: 1}, {"text": "a", "display_name": "n" * 100_000}):
        yield Probe(label, "POST", "/contexts", json.dumps(body).encode())


def probes() -> list[Probe]:
    return [*_stop_probes(), *_number_probes(), *_token_probes(), *_shape_probes()]


def register(base_url: str, headers: dict[str, str], count: int = 1) -> list[dict[str, Any]]:
    """`count` contexts (READY when this returns): their JSON (id, model, ...)."""
    with httpx.Client(base_url=base_url, headers=headers, timeout=60.0) as client:
        texts = [f"{DOC} Copy {index}." for index in range(count)]  # one text, one id
        created = [client.post("/contexts", json={"text": text, "wait": True}) for text in texts]
    return [response.raise_for_status().json() for response in created]


def run_probes(base_url: str, headers: dict[str, str]) -> list[ProbeResult]:
    """Register one context, send every probe, and count the statuses per input class."""
    results: dict[str, ProbeResult] = {}
    context = register(base_url, headers)[0]
    with httpx.Client(base_url=base_url, headers=headers, timeout=60.0) as client:
        for probe in probes():
            path = probe.path.replace("{id}", context["id"])
            body = probe.body
            for name in ("id", "model"):
                body = body and body.replace(b"{%s}" % name.encode(), context[name].encode())
            response = client.request(
                probe.method, path, content=body, params=probe.params,
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            result = results.setdefault(
                probe.input_class, ProbeResult(probe.input_class, Counter(), probe.expected)
            )
            result.statuses[response.status_code] += 1
    return list(results.values())


def markdown(results: list[ProbeResult]) -> str:
    rows = [
        "| Input class (hand-written probes) | Probes | Responses | Expected |",
        "|---|---:|---|---|",
    ]
    for result in results:
        got = ", ".join(f"{status}: {n}" for status, n in sorted(result.statuses.items()))
        expected = " or ".join(str(s) for s in sorted(result.expected))
        rows.append(f"| {result.input_class} | {result.statuses.total()} | {got} | {expected} |")
    return "\n".join(rows) + "\n"
