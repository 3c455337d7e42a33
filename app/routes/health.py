"""`/healthz` (the process answers) and `/readyz` (it can take work)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from app.schemas import HealthPublic
from service.facade import ContextService

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def read_health() -> HealthPublic:
    """Liveness: 200 while the process serves HTTP."""
    return HealthPublic(status="ok")


@router.get(
    "/readyz",
    responses={503: {"model": HealthPublic, "description": "Not ready to take work."}},
)
async def read_readiness(request: Request, response: Response) -> HealthPublic:
    """Readiness: 200 when the service can take work (model loaded), else 503."""
    service: ContextService | None = getattr(request.app.state, "service", None)
    if service is None or not service.is_ready():
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return HealthPublic(status="not_ready")
    return HealthPublic(status="ready")
