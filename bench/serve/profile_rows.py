"""Engine-level decode step of the continuous batch (DecodeRows) against the CUDA-graph
BatchDecoder, on the 8B-shaped random model: where the serving throughput is bounded.

    python -m bench.serve.profile_rows --context-tokens 8192 --rows 1 16 64

For each B: ms per step of DecodeRows with B rows on B different contexts ("rows, different")
and on one context ("rows, same"), the GPU-busy share of that step (CUDA events over the
step vs wall), and BatchDecoder (one context, captured graph) at the same B.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.gpu.run import build_engine
from service.config import CompressionConfig
from service.engine.batch_decode import BatchDecoder
from service.engine.rows import DecodeRows

STEPS = 20


def _rows_ms(engine, contexts, b: int, prompt: list[int]) -> tuple[float, float]:
    rows = DecodeRows(engine.model)
    for i in range(b):
        rows.add(contexts[i % len(contexts)], len(prompt) + STEPS + 8)
        rows.prefill([prompt])
        rows.activate()
    tokens = torch.zeros(b, dtype=torch.long, device="cuda")
    rows.step(tokens)  # warm-up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(STEPS):
        logits = rows.step(tokens)
        tokens = logits.argmax(-1)
    end.record()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / STEPS * 1000
    return wall, start.elapsed_time(end) / STEPS


def _graph_ms(engine, context, b: int, prompt: list[int]) -> float:
    decoder = BatchDecoder(engine.model, context, [prompt] * b, STEPS + 4, set(), use_graph=True)
    with torch.inference_mode():
        logits = decoder.prefill()
        tokens = logits.argmax(-1)
        decoder.step(tokens)  # capture
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(STEPS):
            tokens = decoder.step(tokens).argmax(-1)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / STEPS * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context-tokens", type=int, default=8192)
    p.add_argument("--contexts", type=int, default=16)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--tokenizer", default="bench/.cache/tokenizer")
    p.add_argument("--out", type=Path, default=Path("bench/results/serve-profile.json"))
    args = p.parse_args()
    engine = build_engine(args.tokenizer, "auto")
    gen = torch.Generator().manual_seed(0)
    contexts = []
    for _ in range(args.contexts):
        ids = torch.randint(100, 30000, (args.context_tokens,), generator=gen).tolist()
        doc = engine.encode_document("x")
        doc = type(doc)(doc.prefix_ids, ids)
        ctx, _ = engine.ingest(doc, CompressionConfig("kvzip", 0.3))
        contexts.append(ctx)
    prompt = engine.encode_question("What is the pass key?")
    result = {
        "gpu": torch.cuda.get_device_name(),
        "context_tokens": args.context_tokens,
        "ratio": 0.3,
        "steps": STEPS,
        "rows": {},
    }
    for b in args.rows:
        diff_wall, diff_gpu = _rows_ms(engine, contexts, b, prompt)
        same_wall, same_gpu = _rows_ms(engine, contexts[:1], b, prompt)
        graph = _graph_ms(engine, contexts[0], b, prompt)
        result["rows"][str(b)] = {
            "rows_different_ms": diff_wall,
            "rows_different_gpu_ms": diff_gpu,
            "rows_same_ms": same_wall,
            "rows_same_gpu_ms": same_gpu,
            "graph_same_ms": graph,
        }
        print(
            f"B={b}: rows different {diff_wall:.1f} ms (GPU {diff_gpu:.1f}), rows same "
            f"{same_wall:.1f} ms (GPU {same_gpu:.1f}), BatchDecoder graph {graph:.1f} ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
