"""Where the fp8 error is: keys vs values, plain vs centred (docs/quality.md, "Quantized storage").

The same documents, questions and teacher forcing as bench/quality/quantization.py, but each
selection's context rows (the prefix rows are never quantized) are coded with
service.engine.quantization's fp8 and decoded back for the keys only, the values only or
both, with and without centring; the others stay exact (fp32). Only KL and argmax flips of
the full-cache answer, no generation.

    OMP_NUM_THREADS=1 python -m bench.quality.fp8_split   # ~5 min on a free core
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from bench.quality import metrics
from bench.quality.data import load_articles, qa_tasks
from bench.quality.runner import teacher_forced
from service.compression.selection import select
from service.config import CompressionConfig, EngineConfig
from service.engine import quantization
from service.engine.kvcache import CompressedContext
from service.engine.kvzip_engine import KVzipEngine
from service.types import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {  # name -> (fields coded in fp8, centred)
    "exact (fp32)": ((), False),
    "fp8 keys + values": (("keys", "values"), False),
    "fp8 keys only": (("keys",), False),
    "fp8 values only": (("values",), False),
    "fp8 centred keys + values": (("keys", "values"), True),
    "fp8 centred keys only": (("keys",), True),
    "fp8 centred values only": (("values",), True),
}


def coded(ctx: CompressedContext, fields: tuple[str, ...], centred: bool) -> CompressedContext:
    """`ctx` with `fields` of its context rows through fp8 and back."""
    layers = []
    for layer in ctx.layers:
        rest = layer.positions.long() >= ctx.prefix_len
        part = layer.keep(rest)
        stored = quantization.quantize(part, "fp8", 64, centred=centred)
        back = dict(zip(("keys", "values"), quantization.dequantize(
            stored, part.cu_lens, "fp8", 64, layer.keys.dtype), strict=True))  # fmt: skip
        new = {}
        for field in fields:
            whole = getattr(layer, field).clone()
            whole[rest] = back[field]
            new[field] = whole
        layers.append(replace(layer, **new))
    return replace(ctx, layers=tuple(layers))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.quality.fp8_split")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/fp8-split-cpu.json")
    args = p.parse_args(argv)
    engine = KVzipEngine.load(EngineConfig(device="cpu", dtype="float32"))
    count = lambda text: len(engine.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    tasks = qa_tasks(load_articles(), count, 1500, args.docs, 4)
    params = SamplingParams(max_new_tokens=24)
    sums: dict[str, list[float]] = {}
    for task in tasks:
        full = engine.prefill_context(
            engine.encode_document(task.text), CompressionConfig("kvzip", 1.0)
        )
        scored = engine.score(full, method="kvzip")
        prompts = [engine.encode_question(q.text) for q in task.questions]
        refs = [list(engine.generate(full, p, params)) for p in prompts]
        ref_logits = [
            teacher_forced(engine, full, p, r) for p, r in zip(prompts, refs, strict=True)
        ]
        for ratio in (0.3, 0.1):
            ctx = select(scored, ratio)
            for name, (fields, centred) in VARIANTS.items():
                variant = coded(ctx, fields, centred)
                for p, r, logits in zip(prompts, refs, ref_logits, strict=True):
                    kl, flips = metrics.divergence(logits, teacher_forced(engine, variant, p, r))
                    acc = sums.setdefault(f"{ratio} {name}", [0.0, 0.0, 0.0])
                    acc[0], acc[1], acc[2] = acc[0] + kl, acc[1] + flips, acc[2] + logits.shape[0]
        sys.stderr.write(f"{task.name}\n")
    rows = [{"variant": k, "kl": kl / n, "flips": f / n} for k, (kl, f, n) in sums.items()]
    args.out.write_text(json.dumps({"docs": args.docs, "rows": rows}, indent=1))
    lines = ["| ratio | stored | KL(full ‖ ·) per token | argmax flips |", "|---|---|---|---|"]
    for r in rows:
        ratio, _, name = r["variant"].partition(" ")
        lines.append(f"| {ratio} | {name} | {r['kl']:.4f} | {r['flips']:.3f} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
