"""Quantized storage on the default model: stored bytes and fidelity of none / fp8 / int4.

For a few SQuAD documents: one prefill + KVzip scoring, then per ratio the selected context
is stored with every quantization (service.codec), decoded back, and compared with the
full (unevicted, unquantized) cache: the full-cache greedy answer teacher-forced under each
context, mean KL(full || stored) of the next-token distributions per position, argmax flips,
and whether the greedy answer is the one of the same context unquantized. Bytes are the
stored object over the full cache in bf16 (2 x K,V x layers x KV heads x head_dim x tokens).

    .venv/bin/python -m bench.quality.quantization            # CPU, 4 documents, ~3 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.quality import metrics
from bench.quality.data import load_articles, qa_tasks
from bench.quality.runner import teacher_forced
from service import codec
from service.compression.selection import select
from service.config import CompressionConfig, EngineConfig
from service.engine.kvcache import CompressedContext
from service.engine.kvzip_engine import KVzipEngine
from service.types import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "results" / "quantization-cpu.json"


def _log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")


def full_bf16_bytes(ctx: CompressedContext) -> int:
    layer = ctx.layers[0]
    return 2 * 2 * len(ctx.layers) * layer.n_heads * layer.keys.shape[1] * ctx.seq_len


def as_bf16(ctx: CompressedContext) -> CompressedContext:
    """The context as a bf16 model would store it (what `none` costs on a GPU)."""
    layers = tuple(
        replace(layer, keys=layer.keys.bfloat16(), values=layer.values.bfloat16())
        for layer in ctx.layers
    )
    return replace(ctx, layers=layers)


def variants(group_sizes: list[int]) -> list[tuple[str, int]]:
    return [("none", 64), ("fp8", 64), *(("int4", g) for g in group_sizes)]


def run(args: argparse.Namespace) -> list[dict]:
    engine = KVzipEngine.load(EngineConfig(device="cpu", dtype="float32"))
    count = lambda text: len(engine.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    tasks = qa_tasks(load_articles(), count, args.doc_tokens, args.docs, args.questions)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    rows = []
    for task in tasks:
        t0 = time.perf_counter()
        doc = engine.encode_document(task.text)
        full = engine.prefill_context(doc, CompressionConfig("kvzip", 1.0))
        scored = engine.score(full, method="kvzip")
        prompts = [engine.encode_question(q.text) for q in task.questions]
        refs = [list(engine.generate(full, p, params)) for p in prompts]
        ref_logits = [
            teacher_forced(engine, full, p, r) for p, r in zip(prompts, refs, strict=True)
        ]
        for ratio in args.ratios:
            ctx = select(scored, ratio)
            plain = [list(engine.generate(ctx, p, params)) for p in prompts]
            for scheme, group in variants(args.group_sizes):
                source = as_bf16(ctx) if scheme == "none" else ctx
                blob = codec.encode(source, engine.identity, scheme, group)
                ids = codec.prefix_ids(blob)
                prefix = engine.prefix_context(ids) if ids else None
                loaded = codec.decode(blob, engine.identity, "cpu", torch.float32, prefix)
                kl = flips = positions = agree = 0.0
                for prompt, ref, logits, same in zip(prompts, refs, ref_logits, plain, strict=True):
                    got = teacher_forced(engine, loaded, prompt, ref)
                    k, f = metrics.divergence(logits, got)
                    kl, flips, positions = kl + k, flips + f, positions + logits.shape[0]
                    agree += float(list(engine.generate(loaded, prompt, params)) == same)
                rows.append(
                    {
                        "task": task.name,
                        "tokens": full.seq_len,
                        "ratio": ratio,
                        "quantization": scheme,
                        "group_size": group if scheme == "int4" else None,
                        "bytes": len(blob),
                        "bytes_full_bf16": full_bf16_bytes(ctx),
                        "kl_sum": kl,
                        "flips": flips,
                        "positions": positions,
                        "answer_agree": agree / len(prompts),
                    }
                )
        _log(f"{task.name!r} ({full.seq_len} tokens): {time.perf_counter() - t0:.1f}s")
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per (ratio, quantization), bytes / full bf16, mean KL, flips, agreement."""
    lines = [
        "| ratio | quantization | bytes / full bf16 | KL(full ‖ ·) per token | argmax flips "
        "| same greedy answer as unquantized |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["ratio"], r["quantization"], r["group_size"] or 0) for r in rows})
    keys.sort(key=lambda k: (-k[0], ["none", "fp8", "int4"].index(k[1]), k[2]))
    for ratio, scheme, group in keys:
        sel = [
            r
            for r in rows
            if (r["ratio"], r["quantization"], r["group_size"] or 0) == (ratio, scheme, group)
        ]
        size = sum(r["bytes"] for r in sel) / sum(r["bytes_full_bf16"] for r in sel)
        positions = sum(r["positions"] for r in sel)
        kl = sum(r["kl_sum"] for r in sel) / positions
        flips = sum(r["flips"] for r in sel) / positions
        agree = sum(r["answer_agree"] for r in sel) / len(sel)
        name = f"int4 (g={group})" if scheme == "int4" else scheme
        if scheme == "none":
            name = "none (bf16)"
        lines.append(f"| {ratio} | {name} | {size:.4f} | {kl:.4f} | {flips:.3f} | {agree:.2f} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality.quantization")
    p.add_argument("--docs", type=int, default=4, help="SQuAD articles, one document each")
    p.add_argument("--doc-tokens", type=int, default=1500, help="max tokens of a document")
    p.add_argument("--questions", type=int, default=4, help="questions per document")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.1])
    p.add_argument(
        "--group-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64, 128]
    )
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.manual_seed(0)
    rows = run(args)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}))
    sys.stdout.write(table(rows) + "\n")


if __name__ == "__main__":
    main()
