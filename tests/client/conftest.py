"""The live app for the client's tests: the real embedded service over the tiny random model
under uvicorn on a loopback port (tests/app/conftest.py `serving`), with API keys; and a
second one whose keys are rate-limited (2 requests at once, then 1 a second)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.main import create_app
from app.settings import ENV_PREFIX, Settings
from tests.app.conftest import serving

KEY = "sk-client-team-0001"
PAGES_KEYS = {"sync": "sk-client-pages-sync-0002", "async": "sk-client-pages-async-0003"}
"""One tenant per test module's pagination test, so it knows every context listed."""
TEXT = "The museum opens at nine. Tickets cost twelve euros. The cafe closes at five. " * 8
UNKNOWN_ID = "ctx_" + "0" * 32
RATE_PER_MINUTE, RATE_BURST = 60, 2


@dataclass(frozen=True)
class Live:
    url: str
    service: Any


def _settings(data_dir: Path, **overrides: Any) -> Settings:
    with pytest.MonkeyPatch.context() as patch:  # no KVZIP_* of this machine leaks in
        for name in list(os.environ):
            if name.startswith(ENV_PREFIX):
                patch.delenv(name)
        return Settings(chunk_size=64, data_dir=data_dir, **overrides)


@pytest.fixture(scope="package")
def live(tiny_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from service.serving.embedded import build_embedded_service

    keys = {KEY: "client-team", **{key: f"pages-{name}" for name, key in PAGES_KEYS.items()}}
    settings = _settings(tmp_path_factory.mktemp("client-live"), api_keys=keys)
    service = build_embedded_service(settings.to_service_config(), engine=tiny_engine)
    with serving(create_app(settings, service)) as url:
        yield Live(url, service)


@pytest.fixture(scope="package")
def limited(tiny_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Open (one bucket per client address), RATE_BURST at once, then 1 a second."""
    from service.serving.embedded import build_embedded_service

    settings = _settings(
        tmp_path_factory.mktemp("client-limited"),
        rate_limit_per_minute=RATE_PER_MINUTE,
        rate_limit_burst=RATE_BURST,
    )
    service = build_embedded_service(settings.to_service_config(), engine=tiny_engine)
    with serving(create_app(settings, service)) as url:
        yield Live(url, service)


@pytest.fixture(scope="package")
def context_id(live: Live) -> str:
    """TEXT, registered once (READY) by the main tenant."""
    from kvzip.client import Client

    with Client(live.url, KEY) as client:
        return client.create_context(TEXT, display_name="museum").id
