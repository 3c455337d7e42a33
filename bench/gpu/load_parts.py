"""The parts of loading a stored 8B-shaped context at 32K, apart, on the GPU:

    python -m bench.gpu.load_parts --out $OUT/load-parts-cuda.json

- dequantization of every layer (32 layers, 8 KV heads x `--rows` kept rows each, head dim
  128, the shapes of bench.gpu.shapes at ratio 0.3) from device-resident codes to bf16: the
  torch ops (`quantization.dequantize_torch`) against the one Triton launch per layer
  (`quantization.dequantize` on a GPU), CUDA-event timed, median of `--repeats`;
- the storage checksum (the disk tier's tree SHA-256) of an object of `--object-mb` in the
  page cache, through a memory map as `storage` reads it, on 4, 8 and 16 threads, and with the
  map populated up front (MAP_POPULATE) to see what the page faults cost;
- the same object read cold (its pages dropped with posix_fadvise before each read): the
  storage path (map + read-ahead advice + checksum threads) against plain parallel preads
  of 8 MiB pieces on 4, 16 and 32 threads into one buffer (what the disk gives).
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench import page_cache
from service.engine import quantization
from service.engine.kvcache import RaggedLayer
from storage import _checksum


def _median(fn: Callable[[], Any], repeats: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dequantization(rows: int, repeats: int) -> dict[str, Any]:
    """Seconds to dequantize 32 layers, torch ops vs the kernel, per scheme."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d = 8 * rows, 128
    cu = torch.arange(0, n + 1, rows, dtype=torch.int32, device="cuda")
    out: dict[str, Any] = {}
    for scheme in ("fp8", "int4"):
        layers = []
        for _ in range(32):
            keys = torch.randn(n, d, device="cuda", generator=g, dtype=torch.bfloat16) + 2
            values = torch.randn(n, d, device="cuda", generator=g, dtype=torch.bfloat16)
            layer = RaggedLayer(keys, values, cu, torch.zeros(n, device="cuda"), cu[:1].expand(n))
            layers.append(quantization.quantize(layer, scheme, 128))
        stored = sum(t.numel() * t.element_size() for x in layers for t in x.values())

        def run(fn: Callable[..., Any], layers: list[Any], scheme: str) -> Callable[[], Any]:
            return lambda: [fn(x, cu, scheme, 128, torch.bfloat16) for x in layers]

        torch_s = _median(run(quantization.dequantize_torch, layers, scheme), repeats, True)
        kernel_s = _median(run(quantization.dequantize, layers, scheme), repeats, True)
        out[scheme] = {
            "stored_bytes": stored,
            "torch_s": torch_s,
            "kernel_s": kernel_s,
            "kernel_gbps_stored": stored / kernel_s / 1e9,
            "speedup": torch_s / kernel_s,
        }
        print(scheme, out[scheme], flush=True)
    return out


def checksum(object_mb: int, repeats: int) -> dict[str, Any]:
    """Seconds of the tree SHA-256 of a page-cached object through a memory map."""
    out: dict[str, Any] = {"object_bytes": object_mb << 20, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "object"
        path.write_bytes(os.urandom(1 << 20) * object_mb)
        path.read_bytes()  # into the page cache
        for populate in (False, True):
            for threads in (4, 8, 16):
                _checksum._THREADS = threads
                flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)

                def digest(flags: int = flags, populate: bool = populate) -> None:
                    with open(path, "rb") as f:
                        mapped = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
                    if not populate:
                        mapped.madvise(mmap.MADV_WILLNEED)
                    view = memoryview(mapped)
                    _checksum.tree_digest(view)
                    view.release()
                    mapped.close()

                s = _median(digest, repeats, False)
                key = f"{'populated' if populate else 'mapped'}_{threads}_threads"
                out[key] = {"s": s, "gbps": (object_mb << 20) / s / 1e9}
                print(key, out[key], flush=True)
    return out


def _preads(path: Path, threads: int, piece: int = 8 << 20) -> None:
    size = path.stat().st_size
    buffer = memoryview(bytearray(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(
                pool.map(
                    lambda at: os.preadv(fd, [buffer[at : at + piece]], at), range(0, size, piece)
                )
            )
    finally:
        os.close(fd)


def _mapped_digest(path: Path) -> None:
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_WILLNEED)
    view = memoryview(mapped)
    _checksum.tree_digest(view)
    view.release()
    mapped.close()


def cold_read(object_mb: int, repeats: int) -> dict[str, Any]:
    """GB/s reading an object whose pages were dropped: the storage path and plain preads."""
    out: dict[str, Any] = {"object_bytes": object_mb << 20, "checksum_threads": _checksum._THREADS}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        path = Path(tmp) / "object"
        path.write_bytes(os.urandom(1 << 20) * object_mb)
        ways: dict[str, Callable[[], None]] = {"storage_map_verify": lambda: _mapped_digest(path)}
        for t in (4, 16, 32):
            ways[f"pread_{t}_threads"] = functools.partial(_preads, path, t)
        for name, fn in ways.items():
            times = []
            for _ in range(repeats):
                page_cache.drop(path)
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[name] = {
                "s": statistics.median(times),
                "gbps": (object_mb << 20) / statistics.median(times) / 1e9,
            }
            print("cold", name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=9830, help="kept rows per head (0.3 x 32K)")
    parser.add_argument("--object-mb", type=int, default=620)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    default_threads = _checksum._THREADS
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "dequantization_32_layers": dequantization(args.rows, args.repeats),
        "checksum": checksum(args.object_mb, args.repeats),
    }
    _checksum._THREADS = default_threads
    result["cold_read"] = cold_read(args.object_mb, 3)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
