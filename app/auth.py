"""API keys, tenants and the per-key request rate.

`KVZIP_API_KEYS` maps Bearer keys to tenants; the tenant is part of every context id and of
every lookup, so one tenant never sees (or hits the cache of) another's contexts: another
tenant's id is 404. `KVZIP_ADMIN_API_KEY` sees every tenant's contexts (listing, reading,
expiry, deletion, questions); contexts it registers belong to the default tenant "". With no
key configured the service is open (everyone is the default tenant), which start-up logs as
fit for local use only.

Rate: a token bucket per key (per client address when open), `KVZIP_RATE_LIMIT_PER_MINUTE`
refilled per minute, at most `KVZIP_RATE_LIMIT_BURST` at once; beyond it, 429 with
Retry-After. Buckets live in this process (each API replica counts on its own).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from app.settings import Settings
from service.types import ANY_TENANT

__all__ = ["Principal", "PrincipalDep", "RateLimiter", "authenticate", "log_access_mode"]

logger = logging.getLogger(__name__)

_bearer = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <key>`; needed only when the server has API keys.",
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant that owns what they create, and whether they are admin."""

    tenant: str
    admin: bool = False
    key_id: str = "open"  # a digest of the key (or the client address when open): rate bucket

    @property
    def scope(self) -> str:
        """The tenant to look contexts up in: every tenant for the admin key."""
        return ANY_TENANT if self.admin else self.tenant


class RateLimiter:
    """Token buckets by key: `per_minute` refill, `burst` capacity; thread-safe."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def acquire(self, key: str, now: float | None = None) -> float:
        """0 when the request may go; else the seconds until it may (nothing is taken)."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def _identify(settings: Settings, key: str) -> Principal | None:
    """The principal of `key`, comparing in constant time against every configured key."""
    key_id = "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    found: Principal | None = None
    if settings.admin_api_key is not None and hmac.compare_digest(
        key.encode(), settings.admin_api_key.encode()
    ):
        found = Principal("", admin=True, key_id=key_id)
    for known, tenant in (settings.api_keys or {}).items():
        if hmac.compare_digest(key.encode(), known.encode()):
            found = Principal(tenant, key_id=key_id)
    return found


def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller (401 without a valid key when keys are configured), rate-limited (429)."""
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        client = request.client.host if request.client else "unknown"
        principal = Principal("", key_id=f"addr-{client}")
    elif credentials is None:
        raise _unauthorized("an API key is required: send `Authorization: Bearer <key>`")
    else:
        found = _identify(settings, credentials.credentials)
        if found is None:
            raise _unauthorized("invalid API key")
        principal = found
    limiter: RateLimiter = request.app.state.rate_limiter
    if wait := limiter.acquire(principal.key_id):
        raise HTTPException(
            429,
            f"rate limit of {settings.rate_limit_per_minute} requests per minute exceeded; "
            f"retry in {wait:.1f} s",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    return principal


def log_access_mode(settings: Settings) -> None:
    """Say at start-up who may call, loudly when anyone may."""
    if settings.auth_enabled:
        tenants = sorted(set((settings.api_keys or {}).values()))
        admin = "an admin key" if settings.admin_api_key else "no admin key"
        logger.info("API keys required: %d tenant(s) %s, %s", len(tenants), tenants, admin)
        return
    local = settings.host in ("127.0.0.1", "localhost", "::1")
    logger.warning(
        "no API key configured (KVZIP_API_KEYS / KVZIP_ADMIN_API_KEY): the API is OPEN to "
        "anyone who can reach %s:%d; fit for local use only%s",
        settings.host,
        settings.port,
        "" if local else " -- and this address is not local",
    )


PrincipalDep = Annotated[Principal, Depends(authenticate)]
