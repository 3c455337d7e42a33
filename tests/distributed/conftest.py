"""Fixtures of the distributed tests: a Redis prefix per test (cleaned up afterwards) and no
KVZIP_* variable of the machine leaking into Settings."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from tests.storage.storage_testing import RedisEnv


@pytest.fixture
async def redis_env() -> AsyncIterator[RedisEnv]:
    env = RedisEnv()
    yield env
    await env.close()


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KVZIP_"):
            monkeypatch.delenv(name)
