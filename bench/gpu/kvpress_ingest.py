"""Peer: NVIDIA kvpress's `KVzipPress` ingest time on the Llama-3.1-8B-shaped model.

Runs in the kvpress environment (kvpress 0.5.5 and the transformers 5.2.0 it pins, first on
sys.path; bench/quality/kvpress_env.py explains why), on the GPU:

    PYTHONPATH=KVPRESS_TARGET:bench/quality/kvpress_stubs:. \\
        python -m bench.gpu.kvpress_ingest --lengths 8192 32768 --out kvpress.json

At every length, side by side in one process: transformers' plain prefill of the base model
(sdpa, DynamicCache) and the same call inside `with KVzipPress(compression_ratio=0.7)(model)`
(keep 0.3), as kvpress's pipeline runs it; the result is press / plain. Same token ids as
bench.gpu.run (seeded by the length). A length that fails (out of memory) keeps its error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from bench.gpu.shapes import LLAMA_8B


def _seconds(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, n: int, ratio: float) -> dict:
    """Plain prefill and KVzipPress prefill of n random tokens: seconds and their ratio."""
    from kvpress import KVzipPress

    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(100, 49000, (1, n), generator=gen).to("cuda")

    def plain() -> None:
        model.model(input_ids=ids, past_key_values=DynamicCache())

    def press() -> None:
        with KVzipPress(compression_ratio=1.0 - ratio)(model):
            model.model(input_ids=ids, past_key_values=DynamicCache())

    row: dict = {"tokens": n}
    with torch.inference_mode():
        row["plain_prefill_s"] = _seconds(plain)
        torch.cuda.reset_peak_memory_stats()
        row["kvzippress_ingest_s"] = _seconds(press)
        row["kvzippress_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["kvzippress_over_prefill"] = row["kvzippress_ingest_s"] / row["plain_prefill_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--tokenizer", default="bench/.cache/tokenizer")
    parser.add_argument("--ratio", type=float, default=0.3, help="kept fraction")
    parser.add_argument("--out", default="bench/results/gpu-kvpress.json")
    args = parser.parse_args()
    from importlib.metadata import version

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_8B, attn_implementation="sdpa")).eval()
    torch.set_default_dtype(torch.float32)
    model.config.name_or_path = args.tokenizer  # KVzipPress loads its tokenizer from here
    result = {
        "command": "python -m bench.gpu.kvpress_ingest " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "transformers": transformers.__version__,
        "kvpress": version("kvpress"),
        "kept_ratio": args.ratio,
        "rows": [],
    }
    with torch.inference_mode():  # warm-up: kernels, the press's tokenizer
        measure(model, 2048, args.ratio)
    for n in args.lengths:
        try:
            row = measure(model, n, args.ratio)
        except Exception as exc:  # out of memory at 128K: keep the error, go on
            row = {"tokens": n, "error": f"{type(exc).__name__}: {exc}"[:400]}
        torch.cuda.empty_cache()
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
