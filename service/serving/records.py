"""Context records: the small JSON document that says a context exists and what it is.

Stored next to the compressed blob under `<id>.json`; written after the blob, so a record
always points at a complete object. The blob describes its record too (`describe`, in its
safetensors metadata), so a record that is lost (Redis flushed, the file deleted) is rebuilt
from the blob alone (`described_record`). (No torch here.)
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime

from service.errors import InvalidInputError
from service.types import ANY_TENANT, CompressionStats, ContextInfo, ContextPage

log = logging.getLogger(__name__)

PROCESSING, READY, FAILED = "PROCESSING", "READY", "FAILED"
BLOB_SUFFIX = ".safetensors"
DESCRIPTION = "record"
"""The metadata entry of a stored object that holds its record (JSON)."""
_UNDESCRIBED = ("bytes", "state", "progress", "error")  # what the object itself says


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
    system: str | None = None  # the system instruction in the prefix; queries reuse its layout
    quantization: str = "none"  # how the stored keys/values are quantized
    bytes_full_bf16: int = 0  # the full, unevicted cache in bf16 (0: recorded before 0.3)

    def to_json(self) -> builtins.bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_json(data: builtins.bytes) -> ContextRecord:
        return ContextRecord(**json.loads(data))

    def visible_to(self, tenant: str) -> bool:
        """True for the owning tenant and for admin lookups (ANY_TENANT)."""
        return tenant in (self.tenant, ANY_TENANT)

    def expired(self, now: datetime | None = None) -> bool:
        if self.expire_time is None:
            return False
        return datetime.fromisoformat(self.expire_time) <= (now or datetime.now(UTC))

    def info(self) -> ContextInfo:
        stats = CompressionStats(
            self.method,
            self.ratio,
            self.kept_kv_pairs,
            self.total_kv_pairs,
            self.bytes,
            self.quantization,
            self.bytes_full_bf16,
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


def blob_key(context_id: str) -> str:
    return f"{context_id}{BLOB_SUFFIX}"


def is_blob_key(key: str) -> bool:
    """True for the storage key of a compressed context (not of a record)."""
    return key.endswith(BLOB_SUFFIX)


def record_key(context_id: str) -> str:
    return f"{context_id}.json"


def is_context_id(cid: str) -> bool:
    """True for an id shaped like the ones this service gives (`ctx_` + 32 hex digits)."""
    digits = cid.removeprefix("ctx_")
    return len(cid) == 36 and len(digits) == 32 and not digits.strip("0123456789abcdef")


def describe(record: ContextRecord) -> dict[str, str]:
    """The metadata entry that lets a stored object stand for its record: every field but
    those the object gives by itself (its size; that it exists, so READY)."""
    body = {k: v for k, v in asdict(record).items() if k not in _UNDESCRIBED}
    return {DESCRIPTION: json.dumps(body, sort_keys=True)}


def described_record(cid: str, meta: Mapping[str, str], nbytes: int) -> ContextRecord | None:
    """The READY record a stored object of `nbytes` bytes describes, or None when its
    metadata holds no record (objects written before it did), another id's, or a broken one."""
    raw = meta.get(DESCRIPTION)
    if raw is None:
        return None
    known = {f.name for f in fields(ContextRecord)} - set(_UNDESCRIBED)
    try:
        body = json.loads(raw)
        given = {k: v for k, v in body.items() if k in known}
        record = ContextRecord(**given, bytes=nbytes, state=READY, progress=1.0, error=None)
        record.info()  # its times and numbers parse too
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.error("the object of %s describes no usable record (%s)", cid, exc)
        return None
    if record.id != cid:
        log.error("the object stored as %s describes %s; not restored", cid, record.id)
        return None
    return record


def listing_order(info: ContextInfo) -> tuple[float, str]:
    """Listing order: oldest first, ties by id."""
    return info.create_time.timestamp(), info.id


def encode_page_token(position: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(position)).encode()).decode()


def decode_page_token(token: str) -> tuple[float, str]:
    """The listing position a token names: a finite, in-range POSIX time and a context id.

    Anything else (NaN, a huge integer, a bool, an id not shaped `ctx_<32 hex>`) is
    InvalidInputError, so no such value ever reaches a comparison or a Redis range query.
    """
    latest = 253402300799.0  # 9999-12-31T23:59:59Z, the last instant datetime can hold
    refused = InvalidInputError("page_token is not a token this service issued")
    try:
        stamp, cid = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError, binascii.Error, RecursionError) as exc:
        raise refused from exc
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not isinstance(cid, str):
        raise refused
    if not 0.0 <= stamp <= latest or not is_context_id(cid):  # NaN too; no float() of a huge int
        raise refused
    return float(stamp), cid


def paginate(
    contexts: Iterable[ContextInfo], page_size: int, page_token: str | None
) -> ContextPage:
    """One page of `contexts` in listing order, after the position `page_token` names."""
    if page_size < 1:
        raise InvalidInputError(f"page_size must be >= 1. Given: {page_size}")
    ordered = sorted(contexts, key=listing_order)
    if page_token:
        after = decode_page_token(page_token)
        ordered = [info for info in ordered if listing_order(info) > after]
    page = ordered[:page_size]
    more = len(ordered) > page_size
    return ContextPage(page, encode_page_token(listing_order(page[-1])) if more else None)
