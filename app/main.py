"""The FastAPI application factory. Importing this module loads nothing heavy.

`uvicorn --factory app.main:create_app` (or `python -m app`) builds the app from the
environment; the model is loaded by the lifespan, not at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.auth import log_access_mode
from app.errors import install_error_handlers
from app.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.openapi import install_openapi
from app.ratelimit import build_rate_limits
from app.routes import contexts, health, openai
from app.settings import Settings
from service.facade import ContextService

__all__ = ["create_app"]

_DESCRIPTION = """
Gemini-like context resources (`/contexts`), questions as JSON or Server-Sent Events,
an OpenAI-compatible `/v1/chat/completions`, health and Prometheus metrics.
Errors are `{"error": {"code", "message"}}`; every response carries `X-Request-Id`.
When the server has API keys, send `Authorization: Bearer <key>`. See docs/api.md.
"""


def create_app(settings: Settings | None = None, service: ContextService | None = None) -> FastAPI:
    """The HTTP app over `service`, or over an embedded service built from `settings`.

    The lifespan owns the service either way: it awaits `start()` before serving and
    `close()` on shutdown. Until `start()` returns, routes answer 503.
    """
    settings = settings if settings is not None else Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log_access_mode(settings)
        running = service if service is not None else build_default_service(settings)
        try:
            await running.start()
        except BaseException:
            await running.close()
            raise
        app.state.service = running
        try:
            yield
        finally:
            app.state.service = None
            try:
                await running.close()
            finally:
                await app.state.rate_limiter.aclose()
                await app.state.auth_failures.aclose()

    app = FastAPI(
        title="KVzip context service",
        summary="Register a document once; answer many questions from its compressed KV cache.",
        description=_DESCRIPTION,
        version=__version__,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = None
    app.state.rate_limiter, app.state.auth_failures = build_rate_limits(settings)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(settings.max_body_bytes))
    app.add_middleware(RequestContextMiddleware)  # outermost: ids and metrics for everything
    app.include_router(health.router)
    app.include_router(contexts.router)
    app.include_router(openai.router)
    install_openapi(app, settings)
    return app


def build_default_service(settings: Settings) -> ContextService:
    """The service `settings.mode` names, built only when the app starts.

    embedded: the model in this process. `service.serving.embedded` imports torch, so it is imported
    here and by name: neither importing nor type-checking app/ reaches the engine; the facade
    Protocol is the contract. distributed: `service.serving.distributed.remote` (no torch), which
    hands every job to the workers through Redis.
    """
    if settings.mode == "distributed":
        remote = importlib.import_module("service.serving.distributed.remote")
        built: ContextService = remote.build_remote_service(settings.to_service_config())
        return built
    embedded = importlib.import_module("service.serving.embedded")
    service: ContextService = embedded.build_embedded_service(settings.to_service_config())
    return service
