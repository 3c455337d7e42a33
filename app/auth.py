"""API keys, tenants and the per-key request rate.

`KVZIP_API_KEYS` maps Bearer keys to tenants; the tenant is part of every context id and of
every lookup, so one tenant never sees (or hits the cache of) another's contexts: another
tenant's id is 404. `KVZIP_ADMIN_API_KEY` sees every tenant's contexts (listing, reading,
expiry, deletion, questions); contexts it registers belong to the default tenant "". With no
key configured the service is open (everyone is the default tenant), which start-up logs as
fit for local use only; `kvzip serve` refuses it on a non-loopback address unless
`KVZIP_ALLOW_ANONYMOUS=true` (`Settings.check_exposure`).

Rate: a token bucket per key (per client address when open), `KVZIP_RATE_LIMIT_PER_MINUTE`
refilled per minute, at most `KVZIP_RATE_LIMIT_BURST` at once; beyond it, 429 with
Retry-After. Requests without a valid key are throttled too, whatever that setting: each 401
takes a token from the client address's bucket of AUTH_FAILURES_PER_MINUTE (burst
AUTH_FAILURE_BURST), and an address whose bucket is empty gets 429 without its key being
checked, so keys cannot be guessed at speed. The buckets (app.ratelimit) live in this process
in embedded mode and on Redis in distributed mode, where every API replica shares them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from app.ratelimit import RateLimit
from app.settings import Settings
from service.types import ANY_TENANT

__all__ = ["Principal", "PrincipalDep", "authenticate", "log_access_mode"]

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


def _too_many(message: str, wait: float) -> HTTPException:
    return HTTPException(429, message, headers={"Retry-After": str(max(1, math.ceil(wait)))})


def _address(request: Request) -> str:
    return "addr-" + (request.client.host if request.client else "unknown")


async def _identified(
    request: Request, settings: Settings, credentials: HTTPAuthorizationCredentials | None
) -> Principal:
    """The principal of a valid key; else 401, charged to the client address (429 when it
    has had too many, before its key is even checked)."""
    failures: RateLimit = request.app.state.auth_failures
    address = _address(request)
    if wait := await failures.wait(address):
        raise _too_many(
            f"too many requests without a valid API key from this address; retry in {wait:.1f} s",
            wait,
        )
    found = _identify(settings, credentials.credentials) if credentials is not None else None
    if found is None:
        await failures.acquire(address)
        if credentials is None:
            raise _unauthorized("an API key is required: send `Authorization: Bearer <key>`")
        raise _unauthorized("invalid API key")
    return found


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller (401 without a valid key when keys are configured), rate-limited (429)."""
    settings: Settings = request.app.state.settings
    if settings.auth_enabled:
        principal = await _identified(request, settings, credentials)
    else:
        principal = Principal("", key_id=_address(request))
    limiter: RateLimit = request.app.state.rate_limiter
    if wait := await limiter.acquire(principal.key_id):
        raise _too_many(
            f"rate limit of {settings.rate_limit_per_minute} requests per minute exceeded; "
            f"retry in {wait:.1f} s",
            wait,
        )
    return principal


def log_access_mode(settings: Settings) -> None:
    """Say at start-up who may call, loudly when anyone may."""
    if settings.auth_enabled:
        tenants = sorted(set((settings.api_keys or {}).values()))
        admin = "an admin key" if settings.admin_api_key else "no admin key"
        logger.info("API keys required: %d tenant(s) %s, %s", len(tenants), tenants, admin)
        return
    logger.warning(
        "no API key configured (KVZIP_API_KEYS / KVZIP_ADMIN_API_KEY): the API is OPEN to "
        "anyone who can reach %s:%d; fit for local use only%s",
        settings.host,
        settings.port,
        "" if settings.loopback else " -- and this address is not local",
    )


PrincipalDep = Annotated[Principal, Depends(authenticate)]
