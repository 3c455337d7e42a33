"""Where one batch-1 decode step's GPU time goes (Llama-3.1-8B shape, random bf16 weights).

    python -m bench.gpu.profile_decode --tokens 8192 --out profile.json

Ingests a context, builds the decoder (static tail, fused Triton decode), runs warm steps,
then profiles 5 eager steps: every CUDA kernel's total time, grouped into matrix products
(the weight reads the bandwidth floor counts), attention (our Triton decode and merge) and
everything else (norms, RoPE, activations, residual adds, copies), with kernel counts.
The CUDA-graph step time of the same decoder is measured next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.gpu.run import build_engine, sync_time
from service.config import CompressionConfig
from service.engine.batch_decode import BatchDecoder
from service.engine.kvzip_engine import Document

GEMM_MARKS = ("gemm", "gemv", "cutlass", "nvjet", "sm90_xmma", "cublas")
ATTENTION_MARKS = ("_partial_kernel", "_combine_kernel", "_merge", "ragged")  # our Triton decode


def _group(name: str) -> str:
    low = name.lower()
    if any(m in low for m in GEMM_MARKS):
        return "matmul"
    if any(m in low for m in ATTENTION_MARKS):
        return "attention"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--tokenizer", default="bench/.cache/tokenizer")
    parser.add_argument("--backend", default="cudnn")
    parser.add_argument("--out", default="bench/results/gpu-decode-profile.json")
    args = parser.parse_args()
    engine = build_engine(args.tokenizer, args.backend)
    ids = torch.randint(100, 49000, (args.tokens,), generator=torch.Generator().manual_seed(1))
    doc = Document(list(engine.encode_document("x").prefix_ids), ids.tolist())
    ctx, _ = engine.ingest(doc, CompressionConfig("kvzip", args.ratio))
    prompt = list(range(1000, 1024))
    steps = 5
    result: dict = {"tokens": args.tokens, "ratio": args.ratio, "steps_profiled": steps}
    with torch.inference_mode():
        for use_graph in (True, False):
            decoder = BatchDecoder(engine.model, ctx, [prompt], 64, set(), use_graph)
            token = decoder.prefill().argmax(-1)
            for _ in range(3):
                token = decoder.step(token).argmax(-1)
            if use_graph:
                times = []
                for _ in range(20):
                    t0 = sync_time()
                    token = decoder.step(token).argmax(-1)
                    times.append(sync_time() - t0)
                result["graph_step_ms"] = 1000 * statistics.median(times)
                continue
            activities = [torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(steps):
                    token = decoder.step(token).argmax(-1)
                torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    groups: dict[str, dict[str, float]] = {}
    for e in kernels:
        g = groups.setdefault(_group(e.key), {"ms_per_step": 0.0, "kernels_per_step": 0.0})
        g["ms_per_step"] += e.device_time_total / 1000 / steps
        g["kernels_per_step"] += e.count / steps
    result["groups"] = groups
    result["gpu_busy_ms_per_step"] = sum(g["ms_per_step"] for g in groups.values())
    top = sorted(kernels, key=lambda e: e.device_time_total, reverse=True)[:20]
    result["top_kernels"] = [
        {
            "name": e.key[:120],
            "group": _group(e.key),
            "ms_per_step": e.device_time_total / 1000 / steps,
            "calls_per_step": e.count / steps,
        }
        for e in top
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels"}, indent=1))


if __name__ == "__main__":
    main()
