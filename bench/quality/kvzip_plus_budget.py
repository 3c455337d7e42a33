"""`python -m bench.quality.kvzip_plus_budget`: does KVzip+ lose needles at 0.5 by moving
budget between heads? (issue 16, docs/quality.md)

For the grid questions that `kvzip` answers and `kvzip_plus` misses at a ratio: in how
many of the L*H heads each method keeps all of the key's digits (at that ratio and at
smaller ones: a global top-k over fixed scores keeps nested sets, so a key kept at 0.3 is
kept at 0.5), and the answer under two exchanges of the per-head budget:

- kvzip_plus order, kvzip budgets: in every head, the pairs ranked by kvzip_plus but
  given kvzip's score values in that rank order, so the global top-k keeps exactly as many
  pairs per head as kvzip does;
- kvzip order, kvzip_plus budgets: the converse.

    python -m bench.quality.kvzip_plus_budget --questions hay12-q1,hay14-q1 --ratio 0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.quality.needle_grid import ROOT, greedy_answer, grid_tasks
from bench.quality.snapkv_check import heads_keeping, key_positions
from service.compression.selection import select
from service.config import CompressionConfig
from service.engine.kvcache import CompressedContext, RaggedLayer


def exchanged(order: CompressedContext, budget: CompressedContext) -> CompressedContext:
    """`order`'s within-head ranking carrying `budget`'s per-head score values."""
    layers = []
    for a, b in zip(order.layers, budget.layers, strict=True):
        h = a.n_heads
        sa, sb = a.scores.view(h, -1), b.scores.view(h, -1)
        finite = torch.isfinite(sa[0])  # the protected prefix is +inf in every head
        out = sa.clone()
        ctx_a, ctx_b = sa[:, finite], sb[:, finite]
        ranked = torch.argsort(ctx_a, dim=1, descending=True, stable=True)
        values = torch.sort(ctx_b, dim=1, descending=True, stable=True).values
        moved = torch.empty_like(ctx_a)
        moved.scatter_(1, ranked, values)
        out[:, finite] = moved
        layers.append(RaggedLayer(a.keys, a.values, a.cu_lens, out.reshape(-1), a.positions))
    return order.with_layers(tuple(layers))


def main(argv: list[str] | None = None) -> int:
    from bench.quality.__main__ import _engine_config
    from bench.quality.__main__ import parse as grid_parse
    from service.engine.kvzip_engine import KVzipEngine

    p = argparse.ArgumentParser(prog="python -m bench.quality.kvzip_plus_budget")
    p.add_argument("--questions", required=True, help="grid question ids, e.g. hay12-q1")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--smaller", default="0.3,0.2", help="ratios whose key counts are shown")
    p.add_argument("--haystacks", type=int, default=32)
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/kvzip-plus-budget.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = KVzipEngine.load(_engine_config(grid_parse([])))
    wanted = set(args.questions.split(","))
    ratios = [args.ratio] + [float(r) for r in args.smaller.split(",") if r]
    rows = []
    for task in grid_tasks(engine, args.haystacks):
        questions = [q for q in task.questions if q.id in wanted]
        if not questions:
            continue
        full = engine.prefill_context(
            engine.encode_document(task.text), CompressionConfig("kvzip", 1.0, 2000)
        )
        kvzip, plus = engine.score(full, method="kvzip"), engine.score(full, method="kvzip_plus")
        variants = {
            "kvzip": kvzip,
            "kvzip_plus": plus,
            "kvzip_plus order, kvzip budgets": exchanged(plus, kvzip),
            "kvzip order, kvzip_plus budgets": exchanged(kvzip, plus),
        }
        for q in questions:
            key = key_positions(engine, full, q.answers[0])
            prompt = engine.encode_question(q.text)
            row: dict = {"qid": q.id, "key": q.answers[0], "tokens": full.context_len}
            for label, scored in variants.items():
                ctx = select(scored, args.ratio)
                row[label] = {
                    "answer": greedy_answer(engine, ctx, prompt, []),
                    "heads_keeping_key": {
                        f"{r:g}": heads_keeping(select(scored, r), key) for r in ratios
                    },
                }
                row[label]["hit"] = q.answers[0] in row[label]["answer"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    heads = sum(layer.n_heads for layer in full.layers)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(
        json.dumps({"ratio": args.ratio, "heads": heads, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
