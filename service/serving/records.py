"""Context records: the small JSON document that says a context exists and what it is.

Stored next to the compressed blob under `<id>.json`; written after the blob, so a record
always points at a complete object. (No torch here.)
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from service.errors import InvalidInputError
from service.types import ANY_TENANT, CompressionStats, ContextInfo, ContextPage

PROCESSING, READY, FAILED = "PROCESSING", "READY", "FAILED"
BLOB_SUFFIX = ".safetensors"


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
    if not 0.0 <= stamp <= latest:  # also False for NaN, and no float() of a huge int
        raise refused
    hex_digits = cid.removeprefix("ctx_")
    if len(cid) != 36 or len(hex_digits) != 32 or hex_digits.strip("0123456789abcdef"):
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
