"""`Annotated` dependencies shared by the routers."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Path, Request

from app.schemas import CONTEXT_ID_EXAMPLE, CONTEXT_ID_PATTERN
from app.settings import Settings
from service.errors import ContextNotFoundError, EngineUnavailableError, InvalidInputError
from service.facade import ContextService

__all__ = ["ContextIdDep", "ServiceDep", "SettingsDep", "require_text"]

_CONTEXT_ID = re.compile(CONTEXT_ID_PATTERN)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_service(request: Request) -> ContextService:
    """The service the lifespan started; 503 before startup or after shutdown."""
    service: ContextService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise EngineUnavailableError("the context service is not running")
    return service


def valid_context_id(
    context_id: Annotated[
        str,
        Path(
            description="`ctx_` followed by 32 lowercase hex digits.",
            examples=[CONTEXT_ID_EXAMPLE],
        ),
    ],
) -> str:
    """A malformed id names no context: 404, without asking the service."""
    if not _CONTEXT_ID.fullmatch(context_id):
        raise ContextNotFoundError(context_id)
    return context_id


def require_text(field: str, value: str | None, *, blank_ok: bool = False) -> None:
    """400 for text the model cannot take: only whitespace, or not valid Unicode (a lone
    UTF-16 surrogate that JSON allowed through)."""
    if value is None:
        return
    if not blank_ok and not value.strip():
        raise InvalidInputError(f"{field} is empty or whitespace only")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{field} is not valid Unicode (character {exc.start} is a lone surrogate)"
        ) from exc


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[ContextService, Depends(get_service)]
ContextIdDep = Annotated[str, Depends(valid_context_id)]
