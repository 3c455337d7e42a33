"""What the job streams and reply streams carry, and how it is encoded (JSON, no pickle).

A job is one stream entry `{"kind": "ingest"|"query", "body": <JSON>}`. A reply is one
entry of a per-request stream `{"type": "start"|"delta"|"result"|"error", "attempt": <id>,
"body": <JSON>}`; `attempt` names one execution of the job, so an answer restarted by
another worker after a crash is told apart from the first one. Domain errors travel as
`{"type": <class name>, "message": ..., "attrs": {...}}` and are rebuilt as the same class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from service import errors
from service.config import CompressionConfig
from service.errors import ServiceError
from service.types import QueryRequest, QueryResult, QueryTimings, SamplingParams, Turn

INGEST, QUERY = "ingest", "query"
KINDS = (QUERY, INGEST)  # the order a worker reads them in: answers before long ingests


class MalformedJobError(ValueError):
    """A stream entry that is not a job this version understands (dead-lettered at once)."""


@dataclass(frozen=True)
class IngestJob:
    """Prefill, score and store one document under the content-hash id `context_id`."""

    context_id: str
    tenant: str
    text: str
    compression: CompressionConfig
    display_name: str | None = None
    system: str | None = None
    kind: ClassVar[str] = INGEST


@dataclass(frozen=True)
class QueryJob:
    """Answer one question; the answer goes to the reply stream of `request_id`."""

    request_id: str
    context_id: str
    request: QueryRequest
    deadline: float  # unix seconds: past it the asker has given up
    kind: ClassVar[str] = QUERY


Job = IngestJob | QueryJob


def delivered_too_often(deliveries: int, limit: int) -> str:
    """Why a job is dead-lettered."""
    return (
        f"the job was delivered {deliveries} times (at most {limit} allowed) without "
        "completing: the workers that took it crashed or hung"
    )


def encode_job(job: Job) -> dict[str, str]:
    return {"kind": job.kind, "body": json.dumps(asdict(job), separators=(",", ":"))}


def decode_job(fields: Mapping[bytes, bytes]) -> Job:
    """The job in a stream entry; MalformedJobError when it is not one."""
    try:
        kind = fields[b"kind"].decode()
        body = json.loads(fields[b"body"])
        if kind == INGEST:
            return IngestJob(**{**body, "compression": CompressionConfig(**body["compression"])})
        if kind == QUERY:
            return QueryJob(**{**body, "request": _query_request(body["request"])})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedJobError(f"malformed job entry: {exc!r}") from exc
    raise MalformedJobError(f"unknown job kind {kind!r}")


def _query_request(body: dict[str, Any]) -> QueryRequest:
    sampling = body["sampling"]
    return QueryRequest(
        **{
            **body,
            "sampling": SamplingParams(**{**sampling, "stop": tuple(sampling["stop"])}),
            "history": tuple(Turn(**turn) for turn in body.get("history", ())),
        }
    )


# -- errors ----------------------------------------------------------------------------------


def error_payload(exc: ServiceError) -> dict[str, Any]:
    """A domain error as JSON-able data (class name, message, attributes)."""
    attrs = {k: v for k, v in vars(exc).items() if isinstance(v, str | int | float | None)}
    return {"type": type(exc).__name__, "message": str(exc), "attrs": attrs}


def error_from_payload(payload: Mapping[str, Any]) -> ServiceError:
    """The domain error `error_payload` described: same class, message and attributes."""
    cls = _ERROR_TYPES.get(str(payload.get("type")), ServiceError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, str(payload.get("message", "")))
    exc.__dict__.update(payload.get("attrs") or {})
    return exc


def _subclasses(cls: type[ServiceError]) -> list[type[ServiceError]]:
    return [cls, *(s for sub in cls.__subclasses__() for s in _subclasses(sub))]


_ERROR_TYPES = {
    cls.__name__: cls
    for cls in _subclasses(errors.ServiceError)
    if cls.__module__ == errors.__name__
}


# -- replies ---------------------------------------------------------------------------------

START, DELTA, RESULT, ERROR = "start", "delta", "result", "error"


@dataclass(frozen=True)
class Reply:
    """One event of a streamed answer."""

    type: str
    attempt: str
    delta: str = ""
    result: QueryResult | None = None
    error: dict[str, Any] | None = field(default=None)

    def encode(self) -> dict[str, str]:
        body: dict[str, Any] = {}
        if self.type == DELTA:
            body = {"delta": self.delta}
        elif self.type == RESULT and self.result is not None:
            body = {"result": asdict(self.result)}
        elif self.type == ERROR:
            body = {"error": self.error}
        return {"type": self.type, "attempt": self.attempt, "body": json.dumps(body)}

    @staticmethod
    def decode(fields: Mapping[bytes, bytes]) -> Reply:
        body = json.loads(fields[b"body"])
        result = body.get("result")
        if result is not None:
            result = QueryResult(**{**result, "timings": QueryTimings(**result["timings"])})
        return Reply(
            type=fields[b"type"].decode(),
            attempt=fields[b"attempt"].decode(),
            delta=body.get("delta", ""),
            result=result,
            error=body.get("error"),
        )
