"""A context record as Redis holds it (`RemoteRecord`: the record, the tiers that hold its
bytes, its failure and the worker that finished it) and its expiry in Redis terms."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from service.serving.records import ContextRecord
from service.types import ContextInfo


@dataclass(frozen=True)
class RemoteRecord:
    """A context record as the distributed mode stores it."""

    record: ContextRecord
    tiers: tuple[str, ...] = ()  # where the bytes were written ("disk", "redis")
    failure: dict[str, Any] | None = None  # jobs.error_payload of why it FAILED
    worker: str | None = None  # the worker that made it READY or FAILED

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def state(self) -> str:
        return self.record.state

    def info(self) -> ContextInfo:
        return self.record.info()

    def to_json(self) -> bytes:
        body = {
            "record": asdict(self.record),
            "tiers": list(self.tiers),
            "failure": self.failure,
            "worker": self.worker,
        }
        return json.dumps(body, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes | str) -> RemoteRecord:
        body = json.loads(data)
        return RemoteRecord(
            record=ContextRecord(**body["record"]),
            tiers=tuple(body.get("tiers") or ()),
            failure=body.get("failure"),
            worker=body.get("worker"),
        )


def expires_at(record: ContextRecord) -> float:
    """Unix seconds of the record's expiry (+inf for never)."""
    if record.expire_time is None:
        return math.inf
    return datetime.fromisoformat(record.expire_time).timestamp()


def px(record: ContextRecord) -> int | None:
    """Milliseconds the record key should live (None: no expiry)."""
    at = expires_at(record)
    return None if math.isinf(at) else max(1, int((at - time.time()) * 1000))


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
