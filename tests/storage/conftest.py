"""Fixtures for the storage tests: a Redis client per test, under a unique key prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.storage.storage_testing import RedisEnv


@pytest.fixture
async def redis_env() -> AsyncIterator[RedisEnv]:
    """A per-test Redis prefix; its keys are unlinked and the client closed afterwards."""
    env = RedisEnv()
    yield env
    await env.close()
