"""RedisTier read throughput on the local redis-server: redis-py vs the tier's own parallel read.

    python -m bench.redis_read [--mib 1024] [--rounds 5] [--workers 1 2 4]
                               [--out bench/results/redis-read-cpu.json]

One object of `--mib` random bytes is written once (32 MiB parts, keys under a unique
`bench-read:<hex>:` prefix, removed afterwards), then read in rounds, the ways interleaved
within each round:

- `redis-py mget`: what RedisTier.get did before (MGET of every part through redis-py's
  hiredis parser, sha256 of each part on threads, `b"".join`);
- `workers=N`: RedisTier.get with `read_workers=N` (N=1 is the serial read), into a new
  `bytes` per read;
- `workers=2, reused buffer`: RedisTier.get_into a bytearray allocated once (a staging buffer
  that stays mapped: no page faults).

Every read is checked equal to the object. Reports the median GB/s of each way and the CPU
seconds per GB of this process and of the redis-server (from /proc, when it runs here), and
two local ceilings: sha256 on one thread, and filling a new buffer (page faults + writes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from storage.buffers import new_bytes
from storage.redis_tier import RedisTier, _sha256_all, redis_client

URL = "redis://127.0.0.1:6379"
Read = Callable[[], Awaitable[Any]]


def _machine() -> str:
    """The CPU model and core count."""
    model = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of `pid`, 0 when it cannot be read."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _mget_read(client: Redis, tier: RedisTier, key: str) -> bytes | None:
    """The previous RedisTier read: MGET, sha256 per part (threads), join."""
    raw = await client.get(tier.manifest_key(key))
    manifest = json.loads(raw)
    names = [tier.part_key(key, i) for i in range(manifest["part_count"])]
    parts = await client.mget(names)
    digests = await asyncio.to_thread(_sha256_all, parts)
    return b"".join(parts) if digests == manifest["part_sha256"] else None


async def _time(read: Read, expected: bytes, redis_pid: int | None) -> dict[str, float]:
    cpu0, redis0, t0 = time.process_time(), _cpu_s(redis_pid), time.perf_counter()
    got = await read()
    seconds = time.perf_counter() - t0
    cpu, redis_cpu = time.process_time() - cpu0, _cpu_s(redis_pid) - redis0
    if got is None or got != expected:
        raise AssertionError("a read returned other bytes than were stored")
    del got
    gb = len(expected) / 1e9
    return {
        "gb_s": gb / seconds,
        "client_cpu_s_per_gb": cpu / gb,
        "redis_cpu_s_per_gb": redis_cpu / gb,
    }


def _ceilings(data: bytes, rounds: int) -> dict[str, float]:
    """GB/s of sha256 on one thread and of filling a new buffer of the object's size."""
    sha, fill = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        sha.append(len(data) / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        out, view = new_bytes(len(data))
        view[:] = data
        fill.append(len(data) / (time.perf_counter() - t0) / 1e9)
        del out, view
    return {
        "sha256_one_thread_gb_s": round(statistics.median(sha), 3),
        "new_buffer_fill_gb_s": round(statistics.median(fill), 3),
    }


def _summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        k: round(statistics.median(s[k] for s in samples), 3) for k in samples[0]
    }
    out["gb_s_all"] = [round(s["gb_s"], 3) for s in samples]
    return out


async def run(mib: int, rounds: int, workers: list[int]) -> dict[str, Any]:
    client = redis_client(URL, timeout_s=120)
    prefix = f"bench-read:{uuid.uuid4().hex}:"
    tiers = {n: RedisTier(client, prefix=prefix, read_workers=n) for n in workers}
    reuse_tier = RedisTier(client, prefix=prefix, read_workers=2)
    data = os.urandom(mib * 2**20)
    staging = bytearray(len(data))
    info = await client.info("server")
    local = info.get("tcp_port") == 6379 and Path(f"/proc/{info['process_id']}").exists()
    redis_pid = int(info["process_id"]) if local else None
    reads: dict[str, Read] = {"redis-py mget": lambda: _mget_read(client, reuse_tier, "x")}
    reads |= {f"workers={n}": (lambda t=t: t.get("x")) for n, t in tiers.items()}
    reads["workers=2, reused buffer"] = lambda: _staged(reuse_tier, staging)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in reads}
    load_before = os.getloadavg()
    await reuse_tier.put("x", data)
    try:
        for _ in range(rounds):
            for name, read in reads.items():
                samples[name].append(await _time(read, data, redis_pid))
    finally:
        await reuse_tier.delete("x")
        for tier in [*tiers.values(), reuse_tier]:
            tier.close()
        await client.aclose()
    return {
        "object_mib": mib,
        "rounds": rounds,
        "part_mib": 32,
        "redis_version": info.get("redis_version"),
        "machine": _machine(),
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "reads": {name: _summary(s) for name, s in samples.items()},
        "ceilings": _ceilings(data, rounds),
    }


async def _staged(tier: RedisTier, staging: bytearray) -> bytes | None:
    view = await tier.get_into("x", lambda size: memoryview(staging))
    return None if view is None else view.obj  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=Path("bench/results/redis-read-cpu.json"))
    args = parser.parse_args()
    result = asyncio.run(run(args.mib, args.rounds, args.workers))
    for name, row in result["reads"].items():
        print(
            f"{name:26s} {row['gb_s']:.2f} GB/s  client {row['client_cpu_s_per_gb']:.2f} "
            f"+ redis {row['redis_cpu_s_per_gb']:.2f} CPU s/GB  {row['gb_s_all']}"
        )
    print("ceilings (GB/s):", result["ceilings"])
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
