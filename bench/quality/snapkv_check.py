"""`python -m bench.quality.snapkv_check`: why `snapkv` misses needles (issue 16).

Two parts, on the needle grid's haystacks (bench/quality/needle_grid.py):

- variants (`--dev` haystacks: settings are chosen there, never on the grid's): the
  published SnapKV (a per-head budget, average pooling) against the earlier global top-k
  and max pooling, with streaming beside them; hits per ratio.
- diagnose: per haystack and variant at one ratio, what the selection keeps: every head's
  share of the context, in how many of the L*H heads each needle's key digits are all kept
  (and in how many heads `kvzip` keeps them), and the answer when the key digits are
  forced into every head on top of the variant's selection (does the method lose the key,
  or something else?).

    python -m bench.quality.snapkv_check variants --dev --haystacks 8
    python -m bench.quality.snapkv_check diagnose --haystacks 6 --ratio 0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.quality.needle_grid import ROOT, Method, greedy_answer, grid_tasks, run
from service.compression.scorers.snapkv import SnapKVScorer
from service.compression.selection import select
from service.config import CompressionConfig
from service.engine.kvcache import CompressedContext, RaggedLayer
from service.engine.kvzip_engine import KVzipEngine

VARIANTS: dict[str, Method] = {
    "snapkv": SnapKVScorer(),  # as published: per head, avg pool 5
    "snapkv-head-max": SnapKVScorer(per_head=True, pooling="max"),
    "snapkv-global-max": SnapKVScorer(per_head=False, pooling="max"),  # the earlier one
    "streaming": "streaming",
}


def key_positions(engine: KVzipEngine, full: CompressedContext, key: str) -> list[int]:
    """Absolute positions of the key's tokens in the context."""
    ids = full.context_ids.tolist()
    kid = engine.tokenizer.encode(key, add_special_tokens=False)
    for p in range(full.prefix_len, len(ids) - len(kid) + 1):
        if ids[p : p + len(kid)] == kid:
            return list(range(p, p + len(kid)))
    return []


def heads_keeping(ctx: CompressedContext, positions: list[int]) -> int:
    count = 0
    for layer in ctx.layers:
        for h in range(layer.n_heads):
            kept = set(layer.positions[layer.head(h)].tolist())
            count += all(p in kept for p in positions)
    return count


def forced(scored: CompressedContext, positions: list[int]) -> CompressedContext:
    """`scored` with the given positions above every finite score in every head."""
    layers = []
    for layer in scored.layers:
        scores = layer.scores.clone()
        hit = torch.isin(layer.positions, torch.tensor(positions, dtype=layer.positions.dtype))
        scores[hit & torch.isfinite(scores)] = 1e30
        layers.append(RaggedLayer(layer.keys, layer.values, layer.cu_lens, scores, layer.positions))
    return scored.with_layers(tuple(layers))


def diagnose(engine: KVzipEngine, n: int, ratio: float, out: Path) -> None:
    report = []
    for task in grid_tasks(engine, n):
        doc = engine.encode_document(task.text)
        full = engine.prefill_context(doc, CompressionConfig("kvzip", 1.0, 2000))
        s, n_ctx = full.prefix_len, full.context_len
        prompts = [engine.encode_question(q.text) for q in task.questions]
        keys = [key_positions(engine, full, q.answers[0]) for q in task.questions]
        kvzip = select(engine.score(full, method="kvzip"), ratio)
        row: dict = {"task": task.name, "tokens": n_ctx, "depths": task.meta["depths"],
                     "kvzip_heads": [heads_keeping(kvzip, k) for k in keys]}  # fmt: skip
        for label, method in VARIANTS.items():
            scored = engine.score(full, method=method)
            ctx = select(scored, ratio)
            share = torch.stack([layer.lens - s for layer in ctx.layers]).float() / n_ctx
            hits, oracle = [], []
            for q, p, k in zip(task.questions, prompts, keys, strict=True):
                hits.append(q.answers[0] in greedy_answer(engine, ctx, p, []))
                both = select(forced(scored, k), ratio)
                oracle.append(q.answers[0] in greedy_answer(engine, both, p, []))
            row[label] = {
                "head_share_min_median_max": [round(float(x), 3) for x in
                                              (share.min(), share.median(), share.max())],
                "heads": [heads_keeping(ctx, k) for k in keys],
                "hits": hits,
                "hits_with_key_forced": oracle,
            }  # fmt: skip
        report.append(row)
        print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ratio": ratio, "heads": sum(layer.n_heads for layer in
                                                            full.layers), "rows": report},
                              indent=1))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from bench.quality.__main__ import _engine_config
    from bench.quality.__main__ import parse as grid_parse

    p = argparse.ArgumentParser(prog="python -m bench.quality.snapkv_check")
    p.add_argument("part", choices=("variants", "diagnose"))
    p.add_argument("--haystacks", type=int, default=8)
    p.add_argument("--dev", action="store_true")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--ratios", default="0.5,0.3,0.2,0.1")
    p.add_argument("--results", type=Path)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = KVzipEngine.load(_engine_config(grid_parse([])))
    if args.part == "diagnose":
        out = args.results or ROOT / "bench/results/snapkv-diagnose.json"
        diagnose(engine, args.haystacks, args.ratio, out)
        return 0
    out = args.results or ROOT / "bench/results/snapkv-variants-dev.json"
    tasks = grid_tasks(engine, args.haystacks, args.dev)
    ratios = [float(r) for r in args.ratios.split(",")]
    data = run(engine, tasks, VARIANTS, ratios, out, {"command": "snapkv_check variants"})
    for label in ["full", *VARIANTS]:
        line = []
        for r in [1.0, *ratios]:
            got = [x["hit"] for x in data["rows"] if x["method"] == label and x["ratio"] == r]
            if got:
                line.append(f"{r:g}: {100 * sum(got) / len(got):.1f}%")
        print(label, ", ".join(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
