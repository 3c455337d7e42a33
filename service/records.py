"""Context records: the small JSON document that says a context exists and what it is.

Stored next to the compressed blob under `<id>.json`; written after the blob, so a record
always points at a complete object. (No torch here.)
"""

from __future__ import annotations

import builtins
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from service.types import CompressionStats, ContextInfo


@dataclass(frozen=True)
class ContextRecord:
    id: str
    tenant: str
    display_name: str | None
    model: str
    state: str
    create_time: str
    context_tokens: int
    prefix_tokens: int
    method: str
    ratio: float
    chunk_size: int
    kept_kv_pairs: int
    total_kv_pairs: int
    bytes: int  # noqa: A003 (the public field name)
    expire_time: str | None = None  # ISO 8601, UTC; None = never
    progress: float = 1.0
    error: str | None = None

    def to_json(self) -> builtins.bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_json(data: builtins.bytes) -> ContextRecord:
        return ContextRecord(**json.loads(data))

    def info(self) -> ContextInfo:
        stats = CompressionStats(
            self.method, self.ratio, self.kept_kv_pairs, self.total_kv_pairs, self.bytes
        )
        return ContextInfo(
            id=self.id,
            display_name=self.display_name,
            model=self.model,
            state=self.state,
            create_time=datetime.fromisoformat(self.create_time),
            context_tokens=self.context_tokens,
            compression=stats,
            expire_time=datetime.fromisoformat(self.expire_time) if self.expire_time else None,
            progress=self.progress,
            error=self.error,
        )


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def blob_key(context_id: str) -> str:
    return f"{context_id}.safetensors"


def record_key(context_id: str) -> str:
    return f"{context_id}.json"
