"""GPU speed benchmark on a Llama-3.1-8B-shaped model with random bf16 weights.

    python -m bench.gpu.run --lengths 8192 32768 131072 --out bench/results/gpu.json

Measures, side by side in one run (ratios, not absolute numbers, are the result):
ingest (prefill + KVzip scoring + selection + serialisation) / plain transformers prefill;
per-token decode latency at ratios 1.0 / 0.3 / 0.1 (static tail + CUDA graph) next to
transformers' own decode (DynamicCache + sdpa) and next to the bandwidth floor
(weights + kept KV bytes) / measured device-to-device copy bandwidth; time to first token
from a GPU-resident context, from disk (storage.DiskTier get_view / get + codec.decode), from
Redis (storage.RedisTier get + codec.decode, against a local redis-server started by
bench/gpu/redis_local.py) and by re-prefilling; serialisation and host<->device transfer
rates of the stored blob; decode throughput with 1, 4 and 16 concurrent requests; peak GPU
memory and stored bytes per context token.

The storage package imports redis-py: on a machine without it, install the carried wheels
first (`pip install --no-index --no-deps --target /tmp/site bench/.cache/whl/*.whl` and
`PYTHONPATH=/tmp/site`). Without redis-py or a redis-server the rows that need them are
skipped with the reason in `skipped`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, StaticCache

from bench.gpu.shapes import LLAMA_8B
from service import codec
from service.compression.selection import select
from service.config import CompressionConfig, EngineConfig
from service.engine.batch_decode import BatchDecoder
from service.engine.kvzip_engine import Document, KVzipEngine
from service.engine.tensor_blob import unpack
from service.types import SamplingParams


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        t0 = sync_time()
        dst.copy_(src)
        times.append(sync_time() - t0)
    del src, dst
    return 2 * 2 * 1024**3 / statistics.median(times[5:])


def build_engine(tokenizer_dir: str, backend: str = "cuda") -> KVzipEngine:
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_8B)).eval()
    torch.set_default_dtype(torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = EngineConfig(
        device="cuda", dtype="bfloat16", prefill_chunk_tokens=16000, attention_backend=backend
    )
    engine = KVzipEngine(model, tokenizer, "llama-3.1-8b-shaped-random", config)
    engine.eos_ids = set()  # random weights: never stop early
    return engine


def plain_prefill(model, ids: list[int]):
    """transformers' own prefill (sdpa + DynamicCache), timed warm (second call at this
    length); returns (seconds, cold seconds, cache, last logits)."""
    model.set_attn_implementation("sdpa")
    x = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        model(x[:, :512], logits_to_keep=1)  # warm-up
        times = []
        for _ in range(2):  # the first call at a new length builds cuDNN's plans: timed apart
            out = None
            t0 = sync_time()
            out = model(x, use_cache=True, logits_to_keep=1)
            times.append(sync_time() - t0)
    model.set_attn_implementation("kvzip")
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    return times[1], times[0], cache, out.logits[:, -1]


def hf_decode_ms(model, cache, first: torch.Tensor, start: int, steps: int = 24) -> float:
    """transformers' full-cache decode, one token at a time: median ms/token."""
    model.set_attn_implementation("sdpa")
    token = first.argmax(-1, keepdim=True)
    times = []
    kw = "past_key_values" if "past_key_values" in model.forward.__code__.co_varnames else "cache"
    with torch.inference_mode():
        for i in range(steps):
            t0 = sync_time()
            out = model(
                token,
                position_ids=torch.tensor([[start + i]], device="cuda"),
                use_cache=True,
                **{kw: cache},
            )
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(sync_time() - t0)
    model.set_attn_implementation("kvzip")
    return 1000 * statistics.median(times[4:])


def kernels_per_step(engine: KVzipEngine, ctx, prompt: list[int], compiled: bool) -> int:
    """CUDA kernels launched by one decode step, outside a graph (eager or compiled)."""
    decoder = BatchDecoder(engine.model, ctx, [prompt], 4, set(), False, compiled)
    with torch.inference_mode():
        logits = decoder.prefill()
        token = logits.argmax(-1)
        decoder.step(token)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decoder.step(token)
            torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def hf_static_compiled_ms(engine: KVzipEngine, ids: list[int], steps: int = 30) -> float:
    """transformers' StaticCache + torch.compile(mode="reduce-overhead"): median ms/token."""
    model = engine.model
    model.set_attn_implementation("sdpa")
    params = inspect.signature(model.forward).parameters
    kw = "cache" if "cache" in params else "past_key_values"
    n = len(ids)
    cache = StaticCache(config=model.config, max_cache_len=n + steps + 8)
    x = torch.tensor([ids], device=model.device)

    def call(fn: Any, tokens: torch.Tensor, start: int) -> Any:
        pos = torch.arange(start, start + tokens.shape[1], device="cuda").unsqueeze(0)
        extra = {"cache_position": pos[0]} if "cache_position" in params else {}
        return fn(
            input_ids=tokens,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{kw: cache},
            **extra,
        )

    with torch.inference_mode():
        for a in range(0, n, 8192):  # eager prefill in pieces (the mask is pieces x n)
            out = call(model, x[:, a : a + 8192], a)
        step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for i in range(steps):
            t0 = sync_time()
            out = call(step, token, n + i)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(sync_time() - t0)
    model.set_attn_implementation("kvzip")
    return 1000 * statistics.median(times[8:])


def decode_steps(engine, ctx, prompts, steps: int, compiled: bool = False) -> tuple[float, float]:
    """(first-token seconds, median seconds per later step) for a batch of prompts.

    compiled: the torch.compile'd step, captured in the CUDA graph like the eager one.
    """
    stamps = []
    params = SamplingParams(max_new_tokens=steps)
    t0 = sync_time()
    for _ in engine.generate_batch(ctx, prompts, params, compiled=compiled):
        stamps.append(time.perf_counter())
    deltas = [b - a for a, b in zip(stamps[2:], stamps[3:], strict=False)]  # after capture
    return stamps[0] - t0, statistics.median(deltas) if deltas else float("nan")


class Recorder:
    """Writes the result JSON after every phase and logs each phase with its duration, so a
    run cut short by a time limit still leaves every number measured so far."""

    def __init__(
        self, result: dict[str, Any], out: Path, compiled: bool, redis: bool, kvzap: bool = True
    ) -> None:
        self.result, self.out, self.compiled, self.redis = result, out, compiled, redis
        self.kvzap = kvzap
        self.variant_lengths: tuple[int, ...] = ()
        self.t0 = time.perf_counter()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result, indent=2))

    @contextlib.contextmanager
    def phase(self, row: dict, name: str) -> Iterator[None]:
        start = time.perf_counter()
        print(f"[{start - self.t0:7.1f} s] {row['tokens']}: {name} ...", flush=True)
        try:
            yield
        except Exception as exc:  # one failed phase must not lose the others
            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:400]
            print(f"  {name} failed: {row[f'{name}_error']}", flush=True)
        finally:
            row.setdefault("phase_s", {})[name] = time.perf_counter() - start
            self.save()

    @property
    def variants(self) -> tuple[tuple[str, bool], ...]:
        """(key tag, compiled) pairs of the decode variants to measure."""
        return (("", False), ("compiled_", True)) if self.compiled else (("", False),)


def bench_length(
    engine: KVzipEngine, n: int, bw: float, weight_bytes: int, rec: Recorder, hf_static_lengths=()
) -> None:
    """Every measurement at context length n, into a row of rec.result (saved per phase)."""
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(100, 49000, (n,), generator=gen).tolist()
    prefix = list(engine.encode_document("x").prefix_ids)
    doc = Document(prefix, ids[: n - len(prefix)])
    prompt = torch.randint(100, 49000, (24,), generator=gen).tolist()
    row: dict = {"tokens": n}
    rec.result["rows"].append(row)
    s: dict[str, Any] = {}  # state shared by the phases

    with rec.phase(row, "plain_prefill"):
        prefill_s, cold_s, hf_cache, hf_logits = plain_prefill(engine.model, doc.all_ids)
        row.update(plain_prefill_s=prefill_s, plain_prefill_cold_s=cold_s)
        row["hf_decode_ms"] = hf_decode_ms(engine.model, hf_cache, hf_logits, len(doc.all_ids))
        del hf_cache
        torch.cuda.empty_cache()
    if n in hf_static_lengths:
        with rec.phase(row, "hf_static_compiled"):
            row["hf_static_compiled_ms"] = hf_static_compiled_ms(engine, doc.all_ids)
        torch.cuda.empty_cache()
    with rec.phase(row, "ingest"):
        ingest_phase(engine, doc, row, s, weight_bytes)
    if n in rec.variant_lengths:
        with rec.phase(row, "ingest_variants"):
            row["ingest_variants_s"] = ingest_variants(engine, doc)
    if rec.kvzap:
        with rec.phase(row, "kvzap_ingest"):
            kvzap_phase(engine, doc, row)
    with rec.phase(row, "decode"):
        decode_phase(engine, s["full"], prompt, row, bw, weight_bytes, rec.variants)
    with rec.phase(row, "kernels_per_step"):
        for tag, compiled in rec.variants:
            row[f"{tag}kernels_per_step"] = kernels_per_step(engine, s["ctx"], prompt, compiled)
    with rec.phase(row, "ttft_resident"):
        ttft_resident, _ = decode_steps(engine, s["ctx"], [prompt], 3)
        row.update(ttft_resident_s=ttft_resident, ttft_reprefill_s=prefill_s + ttft_resident)
    with rec.phase(row, "transfers"):
        row.update(transfer_rates(s["blob"], row["encode_s"]))
    with rec.phase(row, "ttft_storage"):
        row.update(ttft_from_storage(engine, s["blob"], prompt, row["ttft_reprefill_s"], rec.redis))
    with rec.phase(row, "throughput"):
        throughput_phase(engine, s["ctx"], gen, row, rec.variants)
    s.clear()
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)


def ingest_phase(engine: KVzipEngine, doc: Document, row: dict, s: dict, weight_bytes: int):
    """prefill + scoring (engine.ingest at ratio 1.0), selection at 0.3, serialisation.

    Timed warm, like the plain prefill: a first ingest at this length (cuDNN plans, Triton
    specialisations) is timed as ingest_cold_s and dropped.
    """
    t0 = sync_time()
    engine.ingest(doc, CompressionConfig("kvzip", 1.0))
    row["ingest_cold_s"] = sync_time() - t0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = sync_time()
    full, timings = engine.ingest(doc, CompressionConfig("kvzip", 1.0))  # + keep-all
    t_full = sync_time() - t0
    t0 = sync_time()
    ctx = select(full, 0.3)
    t_select = sync_time() - t0
    t0 = time.perf_counter()
    blob = codec.encode(ctx, engine.identity)
    t_encode = time.perf_counter() - t0
    ingest = timings.prefill_s + timings.scoring_s + t_select + t_encode
    s.update(full=full, ctx=ctx, blob=blob)
    row.update(
        ingest_s=ingest,
        ingest_over_prefill=ingest / row["plain_prefill_s"],
        our_prefill_s=timings.prefill_s,
        scoring_s=timings.scoring_s,
        select_s=t_select,
        encode_s=t_encode,
        ingest_call_s=t_full,
        peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30,
        peak_over_weights_gib=(torch.cuda.max_memory_allocated() - weight_bytes) / 2**30,
        stored_bytes_per_token=len(blob) / len(doc.context_ids),
        stored_over_full_kv=len(blob) / full.nbytes,
    )


def ingest_variants(engine: KVzipEngine, doc: Document) -> dict[str, float]:
    """Seconds of engine.ingest (prefill + KVzip scoring, keep 0.3) per attention backend,
    with the Triton scoring kernels and with the plain-torch scoring, side by side."""
    from unittest import mock

    from service.compression import reconstruction as scoring
    from service.engine import backends

    active = engine.backend.name
    out: dict[str, float] = {}
    for name in [b for b in ("cuda", "cudnn") if b in backends.available_backends()]:
        engine.use_backend(name)
        for tag, triton in (("triton", True), ("torch", False)):
            use = lambda q, backend, t=triton: q.is_cuda and t  # noqa: E731
            with mock.patch.object(scoring, "use_triton", use):
                t0 = sync_time()
                engine.ingest(doc, CompressionConfig("kvzip", 0.3))
                out[f"{name}_{tag}_scores"] = sync_time() - t0
            torch.cuda.empty_cache()
    engine.use_backend(active)
    return out


def random_predictor(engine: KVzipEngine, kind: str, hidden: int = 512):
    """A KVzap predictor of the model's shapes with random weights (timing only: the
    random model's scores mean nothing anyway), tagged with the model's fingerprint."""
    from service.compression.learned.predictor import KVzapPredictor

    cfg = engine.model.config
    layers, dim, heads = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads
    out = hidden if kind == "mlp" else heads
    w = dict(w1=torch.randn(layers, out, dim) * dim**-0.5, b1=torch.zeros(layers, out))
    if kind == "mlp":
        w.update(
            w2=torch.randn(layers, heads, hidden) * hidden**-0.5, b2=torch.zeros(layers, heads)
        )
    return KVzapPredictor(kind, **w, meta={"model_fingerprint": engine.identity.model_fingerprint})


def kvzap_phase(engine: KVzipEngine, doc: Document, row: dict) -> None:
    """Method kvzap (linear and MLP predictors): ingest = prefill with the predictor hooks +
    selection at 0.3 + serialisation, over the plain prefill; no reconstruction pass."""
    from service.compression.learned.predictor import predictor_path, save_predictor

    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("linear", "mlp"):
            save_predictor(
                predictor_path(Path(tmp), engine.identity, kind), random_predictor(engine, kind)
            )
            labelled = engine.with_config(kvzap_dir=Path(tmp), kvzap_kind=kind)
            labelled.ingest(
                Document(doc.prefix_ids, doc.context_ids[:2000]), CompressionConfig("kvzap", 0.3)
            )
            passes = labelled.reconstruction_passes
            t0 = sync_time()
            ctx, timings = labelled.ingest(doc, CompressionConfig("kvzap", 0.3))
            blob = codec.encode(ctx, engine.identity)
            seconds = sync_time() - t0
            assert labelled.reconstruction_passes == passes, "kvzap ran a reconstruction pass"
            row[f"kvzap_{kind}_ingest_s"] = seconds
            row[f"kvzap_{kind}_ingest_over_prefill"] = seconds / row["plain_prefill_s"]
            row[f"kvzap_{kind}_prefill_s"] = timings.prefill_s
            del ctx, blob
    torch.cuda.empty_cache()


def decode_phase(engine, full, prompt, row: dict, bw: float, weight_bytes: int, variants):
    """Batch-1 ms/token at ratios 1.0 / 0.3 / 0.1 per variant, next to the floor."""
    for ratio in (1.0, 0.3, 0.1):
        c = full if ratio == 1.0 else select(full, ratio)
        floor = (weight_bytes + c.nbytes) / bw
        row[f"floor_ms_r{ratio}"] = 1000 * floor
        for tag, compiled in variants:
            _, step = decode_steps(engine, c, [prompt], 40, compiled)
            row[f"decode_{tag}ms_r{ratio}"] = 1000 * step
            row[f"decode_{tag}over_floor_r{ratio}"] = step / floor
    for tag, _ in variants:
        row[f"{tag}r0.3_over_full_latency"] = (
            row[f"decode_{tag}ms_r0.3"] / row[f"decode_{tag}ms_r1.0"]
        )


def throughput_phase(engine, ctx, gen, row: dict, variants) -> None:
    """Tokens/s with 1, 4 and 16 concurrent requests on one resident context."""
    for batch in (1, 4, 16):
        prompts = [torch.randint(100, 49000, (24,), generator=gen).tolist() for _ in range(batch)]
        for tag, compiled in variants:
            _, step = decode_steps(engine, ctx, prompts, 40, compiled)
            row[f"{tag}tokens_per_s_b{batch}"] = batch / step
    for tag, _ in variants:
        row[f"{tag}throughput_16_over_1"] = (
            row[f"{tag}tokens_per_s_b16"] / row[f"{tag}tokens_per_s_b1"]
        )


def transfer_rates(blob: bytes, encode_s: float, repeats: int = 3) -> dict:
    """Serialisation and host->device rates of one stored blob (GB/s, 1e9 bytes).

    encode: codec.encode as timed in the ingest; unpack_h2d: tensor_blob.unpack(blob, "cuda")
    through the pinned staging ring (median of `repeats`); pageable_h2d: one plain pageable
    copy of the same bytes (what unpack did before); pinned_h2d: the DMA ceiling, from one
    pinned buffer of the same size.
    """
    size = len(blob)

    def median_s(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = sync_time()
            fn()
            times.append(sync_time() - t0)
        return statistics.median(times)

    host = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    unpack_s = median_s(lambda: unpack(blob, "cuda"))
    pageable_s = median_s(lambda: host.to("cuda"))
    pinned = host.pin_memory()
    pinned_s = median_s(lambda: pinned.to("cuda", non_blocking=True))
    return {
        "blob_gb": size / 1e9,
        "encode_gb_s": size / encode_s / 1e9,
        "unpack_h2d_s": unpack_s,
        "unpack_h2d_gb_s": size / unpack_s / 1e9,
        "pageable_h2d_gb_s": size / pageable_s / 1e9,
        "pinned_h2d_gb_s": size / pinned_s / 1e9,
    }


def ttft_from_storage(
    engine: KVzipEngine, blob: bytes, prompt: list[int], reprefill: float, redis: bool = True
):
    """Time to first token from the storage tiers: get + codec.decode to the GPU + first token.

    Disk: a DiskTier in a temp folder (warm page cache, as after the ingest that wrote it),
    read with get_view (memory map, streamed into the pinned ring) and with get (bytes).
    Redis: a RedisTier (32 MiB parts, checksums) on a local redis-server.
    """
    row: dict = {}
    skipped: dict[str, str] = {}
    loop = asyncio.new_event_loop()
    try:
        from storage.disk_tier import DiskTier
    except ImportError as exc:  # storage imports redis-py
        skipped["disk"] = skipped["redis"] = f"storage does not import: {exc}"
        print(f"skipping the storage TTFT rows: {exc}", flush=True)
        return {"skipped": skipped}
    with tempfile.TemporaryDirectory() as tmp:
        tier = DiskTier(Path(tmp))
        loop.run_until_complete(tier.put("ctx", blob))
        os.sync()
        for name, read in (("disk", tier.get_view), ("disk_bytes", tier.get)):
            ttft = _ttft(engine, lambda read=read: loop.run_until_complete(read("ctx")), prompt)
            row[f"ttft_{name}_s"] = ttft
            row[f"ttft_{name}_over_reprefill"] = ttft / reprefill
    try:
        if not redis:
            raise RuntimeError("--no-redis")
        ttft = _ttft_redis(engine, blob, prompt, loop)
        row.update(ttft_redis_s=ttft, ttft_redis_over_reprefill=ttft / reprefill)
    except Exception as exc:  # no redis-py, no redis-server, or it failed: only this row goes
        skipped["redis"] = f"{type(exc).__name__}: {exc}"
        print(f"skipping the Redis TTFT row: {skipped['redis']}", flush=True)
    loop.close()
    if skipped:
        row["skipped"] = skipped
    return row


def _ttft(engine: KVzipEngine, get, prompt: list[int]) -> float:
    """Seconds for get() + codec.decode to the GPU + the first generated token."""
    t0 = sync_time()
    data = get()
    loaded = codec.decode(data, engine.identity, "cuda", torch.bfloat16)
    t_load = sync_time() - t0
    first, _ = decode_steps(engine, loaded, [prompt], 3)
    del data, loaded
    return t_load + first


def _ttft_redis(engine: KVzipEngine, blob: bytes, prompt: list[int], loop) -> float:
    from bench.gpu.redis_local import LocalRedis
    from storage.redis_tier import RedisTier, redis_client

    with LocalRedis() as server:
        client = redis_client(server.url, timeout_s=120.0)  # 1.3 GB replies take a while
        tier = RedisTier(client, prefix="bench:")
        try:
            loop.run_until_complete(tier.put("ctx", blob))
            return _ttft(engine, lambda: loop.run_until_complete(tier.get("ctx")), prompt)
        finally:
            loop.run_until_complete(client.aclose())


def attention_kernels(n: int = 32768, repeats: int = 5) -> dict[str, float]:
    """ms of one causal prefill attention (1 x 32 query heads x n x 128, 8 KV heads) by
    kernel: what sdpa picks by itself (transformers' prefill), each sdpa backend alone,
    and the flash varlen call the `cuda` backend makes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from service.engine.backends import cuda as cuda_backend

    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run_sdpa(backend=None):
        if backend is None:
            return sdpa(q, k, v, is_causal=True, enable_gqa=True)
        with sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=True, enable_gqa=True)

    variants = {
        "sdpa_default": lambda: run_sdpa(),
        "sdpa_flash": lambda: run_sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": lambda: run_sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_efficient": lambda: run_sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "ours_flash_varlen": lambda: cuda_backend.causal_attention(q[0], k[0], v[0], 128**-0.5),
    }
    out: dict[str, float] = {}
    for name, fn in variants.items():
        try:
            fn()
            times = []
            for _ in range(repeats):
                t0 = sync_time()
                fn()
                times.append(sync_time() - t0)
            out[name] = 1000 * statistics.median(times)
        except Exception as exc:  # a backend this build/GPU lacks
            out[name + "_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def profile_ingest(engine: KVzipEngine, n: int) -> None:
    """Top CUDA kernels of one warm KVzip ingest (prefill + scoring) of n tokens."""
    ids = torch.randint(100, 49000, (n,)).tolist()
    doc = Document(list(engine.encode_document("x").prefix_ids), ids)
    engine.ingest(doc, CompressionConfig("kvzip", 0.3))  # warm-up
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    ) as prof:
        _, timings = engine.ingest(doc, CompressionConfig("kvzip", 0.3))
        torch.cuda.synchronize()
    print(timings)
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--tokenizer", default="bench/.cache/tokenizer")
    parser.add_argument("--out", default="bench/results/gpu.json")
    parser.add_argument("--profile", type=int, default=0, help="profile one ingest of N tokens")
    parser.add_argument(
        "--hf-static-lengths",
        type=int,
        nargs="*",
        default=[32768],
        help="lengths at which to time transformers' StaticCache + torch.compile decode",
    )
    parser.add_argument(
        "--backend", default="cuda", help="attention backend: cuda (flash varlen) or cudnn"
    )
    parser.add_argument(
        "--compiled",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the torch.compile'd decode step (compiles once, minutes)",
    )
    parser.add_argument(
        "--redis",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time TTFT from a local redis-server",
    )
    parser.add_argument(
        "--variant-lengths",
        type=int,
        nargs="*",
        default=[32768],
        help="lengths at which to time the ingest per backend and scoring-kernel variant",
    )
    parser.add_argument(
        "--kvzap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time method kvzap's ingest (random linear and MLP predictors)",
    )
    args = parser.parse_args()
    bw = copy_bandwidth()
    engine = build_engine(args.tokenizer, args.backend)
    warm = Document(list(engine.encode_document("x").prefix_ids), list(range(1000, 9000)))
    engine.ingest(warm, CompressionConfig("kvzip", 0.3))  # compiles the Triton kernels
    if args.profile:
        profile_ingest(engine, args.profile)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    result: dict[str, Any] = {
        "command": "python -m bench.gpu.run " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "backend": args.backend,
        "copy_bandwidth_tb_s": bw / 1e12,
        "weight_gb": weight_bytes / 1e9,
        "attention_kernels_ms_32k": attention_kernels(),
        "rows": [],
    }
    print(result["attention_kernels_ms_32k"], flush=True)
    rec = Recorder(result, Path(args.out), args.compiled, args.redis, args.kvzap)
    rec.variant_lengths = tuple(args.variant_lengths)
    rec.save()
    for n in args.lengths:
        bench_length(engine, n, bw, weight_bytes, rec, args.hf_static_lengths)


if __name__ == "__main__":
    main()
