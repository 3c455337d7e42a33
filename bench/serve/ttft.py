"""Time to first token through HTTP for a long stored context, by where the context is:

    python -m bench.serve.ttft --random-8b --context-tokens 32768     # (GPU; bench/serve/gpu.sh)

One 8B-shaped (or loaded) model, the production app on a loopback port, one registered
document of `--context-tokens` at kvzip `--ratio`. TTFT = latency of a non-streamed query
with `max_new_tokens` = 1 (question prefill + first token + HTTP), median of `--repeats`,
for each stored `--quantization` (none, fp8, int4):
- resident: the decoded context is on the device (the second query onwards);
- page cache: dropped from the device and the memory tier, the object read (memory-mapped)
  from the disk tier with the file in the OS page cache;
- dropped: the same after `posix_fadvise(DONTNEED)` on every stored file (cold disk);
- redis (`--redis`, default on): the store of a distributed worker (memory -> Redis ->
  disk) on a local redis-server (bench/gpu/redis_local.py), dropped from the device and the
  memory tier, read from Redis (parts in parallel, storage.redis_fetch);
and the decode speed from the resident (dequantized) copy: a 65-token answer less the TTFT
(median of `--repeats`, after a 65-token warm-up), and the same with every stored form
registered side by side and asked in turn (`--decode-rounds`), so drift cannot pass for a
difference between them.
Against: a re-prefill = transformers' own prefill of the document (warm, timed on the same
model) + the resident TTFT; and the disk bound = stored bytes ÷ the disk's read bandwidth
with 4 threads, page cache dropped, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench import page_cache
from bench.gpu.redis_local import LocalRedis
from bench.serve.documents import build_documents
from bench.serve.run import build_app_and_service, build_engine, machine
from bench.serve.server import serving
from storage import RedisTier, redis_client

READ_PIECE = 8 << 20
DECODE_TOKENS = 65
REDIS: dict[str, str] = {}  # the local redis-server's URL while one runs


def disk_read_gbps(path: Path, threads: int = 4) -> float:
    """GB/s reading `path` cold with `threads` parallel preads (page cache dropped first)."""
    page_cache.drop_all(path.parent)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)

    def read(offset: int) -> int:
        return len(os.pread(fd, min(READ_PIECE, size - offset), offset))

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, range(0, size, READ_PIECE)))
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
    assert total == size
    return size / seconds / 1e9


def _wait_for_promotions(service: Any, timeout_s: float = 120.0) -> None:
    """Until the store's background copies into Redis end: one still running keeps the
    object's pages mapped (posix_fadvise cannot drop them) and a core busy."""
    deadline = time.monotonic() + timeout_s
    while service.store.promoting and time.monotonic() < deadline:
        time.sleep(0.05)


def _forget(service: Any, cid: str, *, keep: str = "disk") -> None:
    """Drop the context from the device and from every tier before the one named `keep`
    (the store reads memory -> [Redis ->] disk, so the next read comes from `keep`)."""
    _wait_for_promotions(service)
    service.resident.drop(cid)
    names = [tier.name for tier in service.store.tiers]
    faster = service.store.tiers[: names.index(keep)]

    async def clear() -> None:
        for tier in faster:
            if isinstance(tier, RedisTier):  # its client belongs to the server's event loop
                tier = RedisTier(redis_client(REDIS["url"]), prefix=tier.prefix)
            for key in await tier.keys():
                if cid in key:
                    await tier.delete(key)

    asyncio.run(clear())


def _load_phases(service: Any, cid: str) -> dict[str, float]:
    """Engine level, no HTTP, the object's file in the page cache: seconds to map and verify
    it, then to decode it onto the device (dequantized there), one after the other; and
    `load_s`, the two overlapped as the service loads (the decode runs while the checksum
    is checked: storage open_view)."""
    import torch

    from service import codec
    from service.engine.tensor_blob import unpack
    from service.serving.records import blob_key
    from storage._checksum import tree_digest

    engine = service.pipeline.engine
    disk = service.store.tier("disk")
    asyncio.run(disk.get_view(blob_key(cid)))  # the file into the page cache
    ids = codec.prefix_ids(asyncio.run(disk.get_view(blob_key(cid))))
    prefix = engine.prefix_context(ids) if ids else None  # kept: built at registration

    def decode(view: Any) -> None:
        codec.decode(view, engine.identity, engine.model.device, engine.model.dtype, prefix)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    async def overlapped() -> None:
        pending = await disk.open_view(blob_key(cid))
        await asyncio.gather(asyncio.to_thread(decode, pending.data), pending.settled)

    t0 = time.perf_counter()
    asyncio.run(overlapped())
    t1 = time.perf_counter()
    view = asyncio.run(disk.get_view(blob_key(cid)))
    t2 = time.perf_counter()
    decode(view)
    t3 = time.perf_counter()
    tree_digest(view)  # the verification alone (part of map_verify_s)
    t4 = time.perf_counter()
    unpack(view, engine.model.device)  # the copy to the device alone (part of decode_s)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t5 = time.perf_counter()
    return {"load_s": t1 - t0, "load_gbps": len(view) / (t1 - t0) / 1e9,
            "map_verify_s": t2 - t1, "decode_s": t3 - t2,
            "hash_s": t4 - t3, "unpack_s": t5 - t4}  # fmt: skip


def _query_s(client: httpx.Client, cid: str, question: str, new_tokens: int = 1) -> float:
    return _query(client, cid, question, new_tokens)[0]


def _query(
    client: httpx.Client, cid: str, question: str, new_tokens: int
) -> tuple[float, int, dict[str, float]]:
    """(seconds, tokens generated, the server's timings: load_s, ttft_s, decode_s) of one
    non-streamed query."""
    t0 = time.perf_counter()
    body = {"question": question, "max_new_tokens": new_tokens}
    r = client.post(f"/contexts/{cid}/query", json=body)
    r.raise_for_status()
    seconds, body = time.perf_counter() - t0, r.json()
    return seconds, int(body["usage"]["completion_tokens"]), body["timings"]


def _measure_one(
    client: httpx.Client, service: Any, data_dir: Path, text: str, question: str,
    args: argparse.Namespace, quantization: str,
) -> dict[str, Any]:  # fmt: skip
    """Register `text` stored with `quantization`; TTFT by where the context is."""
    compression = {"method": args.method, "ratio": args.ratio, "quantization": quantization}
    r = client.post("/contexts", json={"text": text, "compression": compression})
    r.raise_for_status()
    cid, stored = r.json()["id"], r.json()["compression"]
    _query(client, cid, question, DECODE_TOKENS)  # warm-up (kernels, graphs, allocator)
    runs: dict[str, list[float]] = {"resident": [], "page_cache": [], "dropped": []}
    server_load: dict[str, list[float]] = {}  # the load_s the server reports, by tier

    def ask(tier: str) -> None:
        seconds, _, timings = _query(client, cid, question, 1)
        runs.setdefault(tier, []).append(seconds)
        server_load.setdefault(tier, []).append(timings["load_s"])

    for _ in range(args.repeats):
        ask("resident")
    decoded = [_query(client, cid, question, DECODE_TOKENS) for _ in range(args.repeats)]
    seconds, tokens = statistics.median(s for s, _, _ in decoded), decoded[0][1]
    decode_ms = (seconds - statistics.median(runs["resident"])) / max(tokens - 1, 1) * 1000
    if any(tier.name == "redis" for tier in service.store.tiers):
        for _ in range(args.repeats):  # the copy written at registration (or refilled)
            _forget(service, cid, keep="redis")
            ask("redis")
    for _ in range(args.repeats):
        _forget(service, cid)
        _query_s(client, cid, question)  # one read to fill the page cache
        _forget(service, cid)
        ask("page_cache")
    for _ in range(args.repeats):
        _forget(service, cid)
        page_cache.drop_all(data_dir)
        ask("dropped")
    phases = [_load_phases(service, cid) for _ in range(args.repeats)]
    path = next(data_dir.rglob(f"*{cid}*.safetensors"))  # the stored object
    object_bytes = path.stat().st_size
    _wait_for_promotions(service)
    gbps = disk_read_gbps(path)
    ttft = {k: statistics.median(v) for k, v in runs.items()}
    client.delete(f"/contexts/{cid}")
    return {
        "context_id": cid,
        "stored_bytes": stored["bytes"],
        "bytes_full_bf16": stored["bytes_full_bf16"],
        "object_bytes": object_bytes,
        "runs_s": runs,
        "ttft_s": ttft,
        "server_load_s": {k: statistics.median(v) for k, v in server_load.items()},
        "load_gbps_page_cache": object_bytes
        / max(ttft["page_cache"] - ttft["resident"], 1e-9)
        / 1e9,
        "disk_read_gbps_4_threads": gbps,
        "engine_load_page_cache": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
        "decode_ms_per_token": decode_ms,
        "decode_tokens": tokens,
    }


def decode_interleaved(
    client: httpx.Client, text: str, question: str, args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    """ms per token of a 65-token answer from each stored form's resident copy, the forms
    registered side by side and asked in turn for `--decode-rounds` rounds, so drift over
    the run falls on every form alike (the per-form rows above measure one after another):
    `client` = the answer's latency less a 1-token answer's, `server` = the server's own
    decode_s (first token to last, no HTTP), both over the 64 tokens after the first."""
    ids = {}
    for quantization in args.quantization:
        compression = {"method": args.method, "ratio": args.ratio, "quantization": quantization}
        r = client.post("/contexts", json={"text": text, "compression": compression})
        r.raise_for_status()
        ids[quantization] = r.json()["id"]
        _query(client, ids[quantization], question, DECODE_TOKENS)  # warm-up, and resident
    ms: dict[str, dict[str, list[float]]] = {"client": {}, "server": {}}
    for _ in range(args.decode_rounds):
        for quantization, cid in ids.items():
            ttft = _query_s(client, cid, question)
            seconds, tokens, timings = _query(client, cid, question, DECODE_TOKENS)
            steps = max(tokens - 1, 1)
            ms["client"].setdefault(quantization, []).append((seconds - ttft) / steps * 1000)
            ms["server"].setdefault(quantization, []).append(timings["decode_s"] / steps * 1000)
    for cid in ids.values():
        client.delete(f"/contexts/{cid}")
    return ms


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from bench.gpu.run import plain_prefill

    engine = build_engine(args)
    doc = build_documents(engine.tokenizer, "haystack", 1, args.context_tokens)[0]
    prefill_s = plain_prefill(engine.model, engine.encode_document(doc.text).all_ids)[0]
    out: dict[str, Any] = {"machine": machine(engine), "settings": vars(args) | {"out": None}}
    out.update(context_tokens=doc.tokens, plain_prefill_s=prefill_s, by_quantization={})
    if args.data_root is not None:
        Path(args.data_root).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        data_dir = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="kvzip-ttft-", dir=args.data_root)
        )
        redis_url = stack.enter_context(LocalRedis()).url if args.redis else None
        REDIS["url"] = redis_url or ""
        app, service = build_app_and_service(args, engine, Path(data_dir), redis_url)
        timeout = httpx.Timeout(1800.0, connect=30.0)
        with serving(app) as url, httpx.Client(base_url=url, timeout=timeout) as client:
            for quantization in args.quantization if args.rows else ():
                row = _measure_one(
                    client, service, Path(data_dir), doc.text, doc.questions[0], args, quantization
                )
                gbps = row["disk_read_gbps_4_threads"]
                reprefill = prefill_s + row["ttft_s"]["resident"]
                disk_bound = row["object_bytes"] / (gbps * 1e9)
                row.update(
                    reprefill_s=reprefill,
                    ttft_over_reprefill={k: v / reprefill for k, v in row["ttft_s"].items()},
                    disk_bound_s=disk_bound,
                    dropped_over_disk_bound=row["ttft_s"]["dropped"] / disk_bound,
                )
                out["by_quantization"][quantization] = row
                print(quantization, json.dumps(row, default=str), flush=True)
            if args.decode_rounds:
                rounds = decode_interleaved(client, doc.text, doc.questions[0], args)
                out["decode_interleaved_ms"] = rounds
                print("decode interleaved ms/token", json.dumps(rounds), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--random-8b", action="store_true")
    p.add_argument("--tokenizer", default="bench/.cache/tokenizer")
    p.add_argument("--backend", default="auto")
    p.add_argument("--context-tokens", type=int, default=32768)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--method", default="kvzip")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quantization", nargs="+", default=["none", "fp8", "int4"])
    p.add_argument(
        "--decode-rounds", type=int, default=5, help="interleaved decode rounds (0: none)"
    )
    p.add_argument(
        "--rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the TTFT rows of each stored form (--no-rows: only the interleaved decode)",
    )
    p.add_argument(
        "--redis",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time TTFT from a Redis tier (a local redis-server: bench/gpu/redis_local.py)",
    )
    p.add_argument("--data-root", default=None, help="where the disk tier lives (a real disk)")
    p.add_argument("--out", type=Path, default=Path("bench/results/ttft-cuda.json"))
    args = p.parse_args(argv)
    # what build_app_and_service reads of the load benchmark's settings
    args.queue_size, args.memory_cache_bytes, args.max_batch_rows = 64, "8GiB", 16
    args.kv_budget_bytes, args.new_tokens = "16GiB", 1
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    for name, row in result["by_quantization"].items():
        ratios = {k: round(v, 3) for k, v in row["ttft_over_reprefill"].items()}
        print(
            f"{name}: {row['object_bytes'] / 1e9:.2f} GB, TTFT / re-prefill {ratios}, disk "
            f"{row['disk_read_gbps_4_threads']:.2f} GB/s, dropped / disk bound "
            f"{row['dropped_over_disk_bound']:.2f}, load {row['load_gbps_page_cache']:.1f} GB/s, "
            f"decode {row['decode_ms_per_token']:.1f} ms/token, engine load "
            f"{row['engine_load_page_cache']}"
        )


if __name__ == "__main__":
    main()
