"""RedisTier.get throughput with redis-py's pure-Python reply parser vs hiredis's C parser.

    python -m bench.redis_parser [--mib 256] [--rounds 4]

One object of `--mib` random bytes is stored once through a RedisTier (32 MiB parts) on the
local redis-server (127.0.0.1:6379, keys under `bench-parser:`, removed afterwards), then
read back by two tiers whose clients differ only in the parser, interleaved round by round;
prints the median GB/s of each and their ratio.
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


def _tier(parser: type) -> RedisTier:
    pool = ConnectionPool(host="127.0.0.1", port=6379, parser_class=parser, socket_timeout=120)
    return RedisTier(Redis(connection_pool=pool), prefix="bench-parser:")


async def main(mib: int, rounds: int) -> None:
    data = os.urandom(mib * 2**20)
    tiers = {"python": _tier(_AsyncRESP2Parser), "hiredis": _tier(_AsyncHiredisParser)}
    await tiers["python"].put("x", data)
    seconds: dict[str, list[float]] = {name: [] for name in tiers}
    for _ in range(rounds):
        for name, tier in tiers.items():
            t0 = time.perf_counter()
            got = await tier.get("x")
            seconds[name].append(time.perf_counter() - t0)
            assert got == data
    await tiers["python"].delete("x")
    rate = {name: len(data) / statistics.median(s) / 1e9 for name, s in seconds.items()}
    for name, value in rate.items():
        print(f"{name:8s} {value:.2f} GB/s")
    print(f"hiredis / python: {rate['hiredis'] / rate['python']:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.mib, args.rounds))
