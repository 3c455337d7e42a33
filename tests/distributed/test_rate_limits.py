"""Rate limits across API processes (issue 14): the Redis token bucket's Lua script against a
Python reference of the refill math (which the in-process limiter follows too), its TTL and
its Redis-down answer, and two real `python -m app` processes on one Redis that together
admit what one bucket allows, not twice that, for the configured rate and the 401 throttle.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import httpx
import pytest
import redis

from app.ratelimit import AUTH_FAILURE_BURST, LocalRateLimiter
from service.errors import EngineUnavailableError
from service.serving.distributed.keys import RedisKeys
from service.serving.distributed.ratelimit import RedisRateLimiter
from tests.storage.storage_testing import RedisEnv

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/0"
KEY = "sk-rate-test-key-0001"


def reference(
    per_minute: float, burst: float, tokens: float, elapsed: float, cost: int
) -> tuple[float, float]:
    """(seconds to wait, tokens left): refill by the elapsed time up to `burst`, then take
    `cost` when a whole token is there, else say how long until one is."""
    rate = per_minute / 60
    tokens = min(burst, tokens + elapsed * rate)
    if tokens < 1:
        return (1 - tokens) / rate, tokens
    return 0.0, tokens - cost


# (per minute, burst, tokens saved, seconds since, cost: 1 acquire, 0 wait)
CASES = [
    (60, 5, 0.0, 0.5, 1),
    (60, 5, 0.2, 3.0, 1),
    (120, 3, 2.5, 100.0, 1),
    (30, 2, 0.0, 0.0, 0),
    (30, 2, 1.5, 10.0, 0),
    (6, 4, 0.3, 0.5, 1),
    (1, 5, 4.0, 30.0, 1),
]
TOLERANCE_S = 0.25  # Redis TIME moves on between the test's seeding and the script's run


@pytest.mark.parametrize(("per_minute", "burst", "tokens", "elapsed", "cost"), CASES)
async def test_the_lua_bucket_follows_the_reference(
    redis_env: RedisEnv, per_minute: int, burst: int, tokens: float, elapsed: float, cost: int
) -> None:
    limiter = RedisRateLimiter(
        redis_env.client, RedisKeys(redis_env.prefix), "t", per_minute, burst
    )
    bucket = RedisKeys(redis_env.prefix).rate("t", "k")
    seconds, micros = await redis_env.client.time()
    now = seconds + micros / 1e6
    await redis_env.client.hset(bucket, mapping={"tokens": tokens, "at": repr(now - elapsed)})

    wait = await (limiter.acquire("k") if cost else limiter.wait("k"))

    expected_wait, expected_left = reference(per_minute, burst, tokens, elapsed, cost)
    left = float(await redis_env.client.hget(bucket, "tokens"))
    rate = per_minute / 60
    assert wait == pytest.approx(expected_wait, abs=TOLERANCE_S)
    assert left == pytest.approx(expected_left if cost else tokens, abs=TOLERANCE_S * rate)
    assert (wait == 0) == (expected_wait == 0)


@pytest.mark.parametrize(("per_minute", "burst", "tokens", "elapsed", "cost"), CASES)
async def test_the_local_bucket_follows_the_same_reference(
    per_minute: int, burst: int, tokens: float, elapsed: float, cost: int
) -> None:
    limiter = LocalRateLimiter(per_minute, burst)
    limiter._buckets["k"] = (tokens, 100.0)

    take = limiter.acquire if cost else limiter.wait
    wait = await take("k", now=100.0 + elapsed)

    expected_wait, expected_left = reference(per_minute, burst, tokens, elapsed, cost)
    assert wait == pytest.approx(expected_wait)
    assert limiter._buckets["k"][0] == pytest.approx(expected_left if cost else tokens)


async def test_a_new_bucket_is_full_and_expires_once_it_would_be_full_again(
    redis_env: RedisEnv,
) -> None:
    keys = RedisKeys(redis_env.prefix)
    limiter = RedisRateLimiter(redis_env.client, keys, "requests", per_minute=6, burst=3)

    assert await limiter.wait("fresh") == 0.0
    assert await redis_env.stored_keys() == []  # looking stores nothing
    admitted = [await limiter.acquire("k") for _ in range(3)]
    refused = await limiter.acquire("k")

    assert admitted == [0.0, 0.0, 0.0]
    assert refused == pytest.approx(10.0, abs=TOLERANCE_S)  # one token per 10 s
    assert await redis_env.stored_keys() == [keys.rate("requests", "k")]
    ttl_ms = await redis_env.client.pttl(keys.rate("requests", "k"))
    assert 29_000 < ttl_ms <= 31_000  # 3 tokens at 0.1 a second, + 1 s


async def test_no_limit_never_asks_redis(redis_env: RedisEnv) -> None:
    limiter = RedisRateLimiter(redis_env.client, RedisKeys(redis_env.prefix), "r", 0, 1)

    assert [await limiter.acquire("k") for _ in range(5)] == [0.0] * 5
    assert await redis_env.stored_keys() == []


async def test_an_unreachable_redis_is_engine_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{port}/0", "p:", "r", 60, 1)
    try:
        with pytest.raises(EngineUnavailableError, match="rate limit cannot be checked"):
            await limiter.acquire("k")
    finally:
        await limiter.aclose()


# --- two API processes on one Redis --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Api:
    url: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_api(env: dict[str, str], log: Path) -> Api:
    port = free_port()
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            env={**env, "KVZIP_PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Api(f"http://127.0.0.1:{port}", popen, log)


def wait_up(apis: list[Api], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    for api in apis:
        while True:
            assert api.popen.poll() is None, api.tail()
            assert time.monotonic() < deadline, f"{api.url} did not start\n{api.tail()}"
            try:
                if httpx.get(f"{api.url}/healthz", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)


@pytest.fixture(scope="module")
def two_apis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Api]]:
    """Two `python -m app` processes, distributed mode, one Redis prefix, 1 request a minute
    with bursts of 5 per key (no worker: the limited route asked is `GET /v1/models`)."""
    prefix = f"kvzip-test:{uuid4().hex}:"
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    env = base | {
        "KVZIP_MODE": "distributed",
        "KVZIP_REDIS_URL": REDIS_URL,
        "KVZIP_REDIS_PREFIX": prefix,
        "KVZIP_HOST": "127.0.0.1",
        "KVZIP_API_KEYS": json.dumps({KEY: "team-a"}),
        "KVZIP_RATE_LIMIT_PER_MINUTE": "1",
        "KVZIP_RATE_LIMIT_BURST": "5",
        "KVZIP_LOG_LEVEL": "warning",
    }
    logs = tmp_path_factory.mktemp("rate-apis")
    apis: list[Api] = []
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        apis = [start_api(env, logs / f"api{i}.log") for i in (1, 2)]
        wait_up(apis)
        yield apis
    finally:
        for api in apis:
            api.popen.terminate()
        for api in apis:
            try:
                api.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                api.popen.kill()
                api.popen.wait(timeout=10)
        leftovers = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if leftovers:
            client.unlink(*leftovers)
        client.close()


def alternate(apis: list[Api], count: int, key: str) -> list[tuple[int, httpx.Response]]:
    """`count` GET /v1/models, to the two processes in turn: (which process, response)."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=5.0, headers=headers) as http:
        return [(i % 2, http.get(f"{apis[i % 2].url}/v1/models")) for i in range(count)]


def test_two_processes_admit_one_bucket_not_two(two_apis: list[Api]) -> None:
    answers = alternate(two_apis, 12, KEY)

    statuses = [response.status_code for _, response in answers]
    assert statuses == [200] * 5 + [429] * 7, [r.text for _, r in answers]
    assert {which for which, r in answers if r.status_code == 429} == {0, 1}
    refused = answers[-1][1]
    error = refused.json()["error"]
    assert error["code"] == "too_many_requests"
    assert "rate limit of 1 requests per minute exceeded" in error["message"]
    assert 50 <= int(refused.headers["Retry-After"]) <= 60  # one token a minute


def test_the_401_throttle_is_shared_too(two_apis: list[Api]) -> None:
    answers = alternate(two_apis, 2 * AUTH_FAILURE_BURST + 4, "sk-wrong-key-0000")

    statuses = [response.status_code for _, response in answers]
    unauthorized = statuses.index(429) if 429 in statuses else len(statuses)
    # 30 a minute refill: a token more at most while these requests run, never a 2nd burst
    assert AUTH_FAILURE_BURST <= unauthorized <= AUTH_FAILURE_BURST + 1, statuses
    assert set(statuses[:unauthorized]) == {401}
    assert set(statuses[unauthorized:]) == {429}
    assert "without a valid API key" in answers[-1][1].json()["error"]["message"]
