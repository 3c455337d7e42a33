"""`/healthz` (the process answers), `/readyz` (it can take work), `/metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from app import metrics
from app.schemas import HealthPublic
from service.facade import ContextService

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    operation_id="read_health",
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
async def read_health() -> HealthPublic:
    """Liveness: 200 while the process serves HTTP."""
    return HealthPublic(status="ok")


@router.get(
    "/readyz",
    operation_id="read_readiness",
    responses={
        200: {"content": {"application/json": {"example": {"status": "ready"}}}},
        503: {
            "model": HealthPublic,
            "description": "Not ready to take work.",
            "content": {"application/json": {"example": {"status": "not_ready"}}},
        },
    },
)
async def read_readiness(request: Request, response: Response) -> HealthPublic:
    """Readiness: 200 when the service can take work, else 503.

    Embedded: the model is loaded and the disk tier is there; distributed: a worker is alive
    and Redis answers.
    """
    service: ContextService | None = getattr(request.app.state, "service", None)
    if service is None or not service.is_ready():
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return HealthPublic(status="not_ready")
    return HealthPublic(status="ready")


_METRICS_EXAMPLE = (
    "# HELP kvzip_http_requests_total HTTP requests answered.\n"
    "# TYPE kvzip_http_requests_total counter\n"
    'kvzip_http_requests_total{method="POST",route="/contexts/{context_id}/query",'
    'status="200"} 42.0\n'
)


@router.get(
    "/metrics",
    operation_id="read_metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition (every name starts with `kvzip_`).",
            "content": {"text/plain": {"schema": {"type": "string"}, "example": _METRICS_EXAMPLE}},
        }
    },
)
async def read_metrics() -> Response:
    """Prometheus metrics: requests, latency, time to first token, inter-token latency,
    queue time, ingest phases, compression, context tokens and the storage tiers."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
