"""Decoding a stored 8B-shaped context at 32K onto the GPU, from the page cache, by scheme:

    python -m bench.gpu.decode_parts --out $OUT/decode-parts-cuda.json

A random context of 32 layers x 8 KV heads x head dim 128 (bench.gpu.shapes), `--tokens`
context tokens behind a `--prefix`-token prefix, each head keeping a random `--ratio` of the
context rows, encoded by `codec.encode` as none / fp8 / int4 and written to a file; then,
median of `--repeats` (after one warm-up, which also runs the dequantization kernel's
first-layer check), the file memory-mapped in the page cache and:
- `decode_s`: `codec.decode` of the whole object onto the GPU (upload + every layer),
  synchronised;
- `upload_s`: `tensor_blob.unpack` alone (the copy of the stored bytes to the device);
- `layers_s` = decode - upload: what turning the uploaded bytes into the resident layers costs
  (kept masks, checks, dequantization, putting the prefix rows back);
- the torch profiler's ten most expensive host-side ops of one decode (`--profile`).
No checksum: bench.gpu.load_parts times that apart.
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from service import codec
from service.engine.fingerprints import ModelIdentity
from service.engine.kvcache import CompressedContext, RaggedLayer
from service.engine.tensor_blob import unpack

_DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run
_IDENTITY = ModelIdentity("llama-3.1-8b-shaped-random", "0" * 64, "0" * 64)


def _layer(g: torch.Generator, heads: int, s: int, n: int, ratio: float) -> RaggedLayer:
    """Every head: the s prefix rows, then a random `ratio` of the n context rows, in order."""
    positions = []
    for _ in range(heads):
        kept = torch.randperm(n, generator=g, device=_DEV)[: int(ratio * n)].sort().values
        positions.append(torch.cat([torch.arange(s, device=_DEV), kept + s]))
    pos = torch.cat(positions).to(torch.int32)
    rows = pos.numel()
    cu = torch.arange(heads + 1, device=_DEV, dtype=torch.int32) * (rows // heads)
    keys = torch.randn(rows, 128, device=_DEV, generator=g, dtype=torch.bfloat16) + 2
    values = torch.randn(rows, 128, device=_DEV, generator=g, dtype=torch.bfloat16)
    scores = torch.rand(rows, device=_DEV, generator=g)
    scores[pos < s] = torch.inf
    return RaggedLayer(keys, values, cu, scores, pos)


def _context(tokens: int, prefix: int, ratio: float) -> tuple[CompressedContext, CompressedContext]:
    """(the context, its prefix's all-kept context as KVzipEngine.prefix_context gives it)."""
    g = torch.Generator(device=_DEV).manual_seed(0)
    layers = tuple(_layer(g, 8, prefix, tokens, ratio) for _ in range(32))
    ids = torch.randint(0, 32000, (prefix + tokens,), dtype=torch.int32)
    ctx = CompressedContext(layers, ids, prefix, "kvzip", ratio, 2048, time.time())
    front = tuple(x.keep(x.positions < prefix) for x in layers)
    return ctx, CompressedContext(front, ids[:prefix], prefix, "kvzip", 1.0, 2048, time.time())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_s(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _profile(fn: Any) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        _sync()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in ops]


def run(tokens: int, prefix: int, ratio: float, repeats: int, profile: bool) -> dict[str, Any]:
    ctx, front = _context(tokens, prefix, ratio)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("none", "fp8", "int4"):
            path = Path(tmp) / scheme
            path.write_bytes(codec.encode(ctx, _IDENTITY, scheme))
            with path.open("rb") as f:  # the map outlives the views the timings keep
                view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            pre = front if codec.prefix_ids(view) else None

            def decode(view: memoryview = view, pre: Any = pre) -> Any:
                return codec.decode(view, _IDENTITY, _DEV, torch.bfloat16, pre)

            decode_s = _median_s(decode, repeats)
            upload_s = _median_s(lambda view=view: unpack(view, _DEV), repeats)
            out[scheme] = {
                "stored_bytes": len(view),
                "decode_s": decode_s,
                "upload_s": upload_s,
                "layers_s": decode_s - upload_s,
                "decode_gbps": len(view) / decode_s / 1e9,
                "profile": _profile(decode) if profile else None,
            }
            print(scheme, {k: v for k, v in out[scheme].items() if k != "profile"}, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--prefix", type=int, default=20)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    result = {
        "device": torch.cuda.get_device_name() if _DEV == "cuda" else "cpu",
        "settings": {k: str(v) for k, v in vars(args).items()},
        "by_scheme": run(args.tokens, args.prefix, args.ratio, args.repeats, args.profile),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
