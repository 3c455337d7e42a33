"""Per-tenant quotas: how many contexts, and how many stored bytes, one tenant may hold.

Checked when a registration would add a context (a document already registered, or still
in flight, is never refused), in both modes over the records that are the truth there: the
embedded registry's, or the Redis records shared by every API process (so a cluster
enforces one count, not one per process). A FAILED context holds nothing and counts for
neither; the bytes are those of READY contexts (a context's size is known once it is
compressed, so the last registration under the quota may take a tenant past it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from service.config import ServiceConfig
from service.errors import StorageQuotaExceededError, TooManyContextsError
from service.serving.records import FAILED, READY, ContextRecord


@dataclass(frozen=True)
class Usage:
    """What one tenant holds: contexts (PROCESSING or READY) and their stored bytes."""

    contexts: int = 0
    stored_bytes: int = 0


def usage_of(records: Iterable[ContextRecord]) -> Usage:
    """The usage of these records (FAILED ones hold nothing)."""
    held = [r for r in records if r.state != FAILED]
    return Usage(len(held), sum(r.bytes for r in held if r.state == READY))


def check_quota(config: ServiceConfig, usage: Usage) -> None:
    """Nothing while the tenant may add a context; else TooManyContextsError or
    StorageQuotaExceededError, saying which limit and how to get under it."""
    most = config.tenant_max_contexts
    if most is not None and usage.contexts >= most:
        raise TooManyContextsError(
            f"this tenant holds {usage.contexts} contexts, the most allowed "
            f"(KVZIP_TENANT_MAX_CONTEXTS={most}); delete some, or let them expire, first"
        )
    most = config.tenant_max_bytes
    if most is not None and usage.stored_bytes >= most:
        raise StorageQuotaExceededError(
            f"this tenant's contexts take {usage.stored_bytes} bytes of storage, the most "
            f"allowed (KVZIP_TENANT_MAX_BYTES={most}); delete some, or let them expire, first"
        )
