"""Bytes by key: memory LRU, Redis (chunked), disk (atomic files), and a tiered store over them.

Knows nothing of models or tensors. See `storage.base` for the contract and the error tree.
"""

from storage.base import (
    CorruptObjectError,
    InvalidKeyError,
    PendingRead,
    StorageError,
    Tier,
    TierFullError,
    TierUnavailableError,
    validate_key,
)
from storage.disk_tier import DiskTier
from storage.memory_tier import MemoryTier
from storage.redis_tier import Manifest, RedisTier, redacted_url, redis_client
from storage.tiered import TieredStore, build_store

__all__ = [
    "CorruptObjectError",
    "DiskTier",
    "InvalidKeyError",
    "Manifest",
    "MemoryTier",
    "PendingRead",
    "RedisTier",
    "StorageError",
    "Tier",
    "TierFullError",
    "TierUnavailableError",
    "TieredStore",
    "build_store",
    "redacted_url",
    "redis_client",
    "validate_key",
]
