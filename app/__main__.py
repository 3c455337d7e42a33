"""`python -m app` (or `kvzip serve`): serve the service on KVZIP_HOST:KVZIP_PORT."""

from __future__ import annotations

import uvicorn

from app.logs import configure_logging
from app.main import create_app
from app.settings import ExposureError, Settings


def serve(settings: Settings | None = None) -> None:
    """Configure logging (text or JSON), then run uvicorn on the app until stopped.

    Raises ExposureError, before anything starts, for an open API on a non-loopback address
    (see `Settings.check_exposure`).
    """
    settings = settings if settings is not None else Settings()
    settings.check_exposure()
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep the handler configure_logging installed
        access_log=False,  # app.middleware logs each request, with its request id
    )


def main() -> None:
    try:
        serve()
    except ExposureError as exc:
        raise SystemExit(f"kvzip: {exc}") from exc


if __name__ == "__main__":
    main()
