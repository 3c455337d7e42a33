"""RedisTier.get throughput by reply parser, side by side, on the local redis-server.

    python -m bench.redis_read [--mib 512] [--rounds 6]

redis-py's pure-Python reply parser vs hiredis's C parser, the same RedisTier otherwise,
interleaved round by round on one stored object of `--mib` random bytes (32 MiB parts; keys
under `bench-read:`, removed afterwards). Prints the median GB/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser
from redis.asyncio import Redis
from redis.asyncio.connection import ConnectionPool

from storage.redis_tier import RedisTier

PREFIX = "bench-read:"


def _client(parser: type) -> Redis:
    pool = ConnectionPool(host="127.0.0.1", port=6379, parser_class=parser, socket_timeout=120)
    return Redis(connection_pool=pool)


async def compare(name: str, tiers: dict[str, RedisTier], data: bytes, rounds: int) -> None:
    seconds: dict[str, list[float]] = {label: [] for label in tiers}
    for _ in range(rounds):
        for label, tier in tiers.items():
            t0 = time.perf_counter()
            got = await tier.get("x")
            seconds[label].append(time.perf_counter() - t0)
            assert got == data
    rate = {label: len(data) / statistics.median(s) / 1e9 for label, s in seconds.items()}
    (a, ra), (b, rb) = rate.items()
    print(f"{name}: {a} {ra:.2f} GB/s, {b} {rb:.2f} GB/s, {b} / {a}: {rb / ra:.2f}x")


async def main(mib: int, rounds: int) -> None:
    data = os.urandom(mib * 2**20)
    python, hiredis = _client(_AsyncRESP2Parser), _client(_AsyncHiredisParser)
    await RedisTier(hiredis, prefix=PREFIX).put("x", data)
    try:
        parsers = {
            "python": RedisTier(python, prefix=PREFIX),
            "hiredis": RedisTier(hiredis, prefix=PREFIX),
        }
        await compare("parser", parsers, data, rounds)
    finally:
        await RedisTier(hiredis, prefix=PREFIX).delete("x")
        await python.aclose()
        await hiredis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(main(args.mib, args.rounds))
