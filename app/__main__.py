"""`python -m app`: serve the embedded service on KVZIP_HOST:KVZIP_PORT."""

from __future__ import annotations

import uvicorn

from app.settings import Settings


def main() -> None:
    settings = Settings()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
    )


if __name__ == "__main__":
    main()
