"""`python -m bench.quality.kvzip_plus_check`: the service's KVzip / KVzip+ scores against the
float64 reference (bench/quality/kvzip_plus_reference.py) on the default model, and the
reference's variants (which queries the max runs over) on dev needle haystacks.

Per haystack: the largest relative difference between the service's fp32 scores and the
reference, the share of the service's top-30% pairs that the reference's top-30% also
holds, and, for each variant, the needle hits at each ratio (needle_grid.run_task).

    python -m bench.quality.kvzip_plus_check --haystacks 10 \
        --results bench/results/kvzip-plus-check.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.quality import needle_grid, needle_report
from bench.quality.kvzip_plus_reference import (
    VARIANTS,
    Chunk,
    float64_copy,
    reference_variants,
)
from service.compression.runner import ModelRunner
from service.compression.scorers import Scorer
from service.compression.selection import budget
from service.engine.kvcache import CompressedContext
from service.engine.prompt import build_layout

ROOT = Path(__file__).resolve().parents[2]


def chunks_of(runner: ModelRunner, full: CompressedContext) -> list[Chunk]:
    """The reconstruction inputs the service builds for `full` (its prompt layout)."""
    layout = build_layout(runner.tokenizer)
    ids, s, n, m = full.context_ids.tolist(), full.prefix_len, full.context_len, full.chunk_size
    out = []
    for a in range(0, n, m):
        b = min(a + m, n)
        previous = ids[s + a - m : s + a] if a else None
        out.append(Chunk(a, b, tuple(layout.reconstruction_ids(ids[s + a : s + b], previous))))
    return out


class Fixed(Scorer):
    """Scores computed elsewhere (the reference's), handed to the grid as a method."""

    name = "fixed"

    def __init__(self, scores: list[torch.Tensor]) -> None:
        self.scores = scores

    def score(self, runner, full, progress=None):  # type: ignore[no-untyped-def]
        return [s.float() for s in self.scores]


def top_share(ours: list[torch.Tensor], ref: list[torch.Tensor], ratio: float = 0.3) -> float:
    """Share of our global top-`ratio` pairs that the reference's top also holds."""
    a, b = torch.cat([x.flatten() for x in ours]), torch.cat([x.flatten() for x in ref])
    k = budget(ratio, a.numel())
    top_a = set(torch.topk(a.double(), k).indices.tolist())
    top_b = set(torch.topk(b.double(), k).indices.tolist())
    return len(top_a & top_b) / k


def compare(engine, model64, task) -> tuple[dict, dict[str, list[torch.Tensor]]]:  # type: ignore[no-untyped-def]
    """Numerics of one haystack, and the reference variants' scores."""
    from service.config import CompressionConfig

    doc = engine.encode_document(task.text)
    full = engine.prefill_context(doc, CompressionConfig("kvzip", 1.0, 2000))
    ref = reference_variants(model64, doc.all_ids, full.prefix_len, chunks_of(engine, full))
    out = {}
    for method in ("kvzip", "kvzip_plus"):
        scored = engine.score(full, method=method)
        s = scored.prefix_len
        ours = [x.scores.view(x.n_heads, -1)[:, s:].double() for x in scored.layers]
        rel = max(
            float(((o - r).abs() / r.clamp_min(1e-30)).max())
            for o, r in zip(ours, ref[method], strict=True)
        )
        out[method] = {"max_rel_diff": rel, "top30_share": top_share(ours, ref[method])}
    return out, ref


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality.kvzip_plus_check")
    p.add_argument("--haystacks", type=int, default=10)
    p.add_argument("--ratios", default="0.5,0.3,0.2,0.1")
    p.add_argument("--variants", default=",".join(VARIANTS), help="reference variants run")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/kvzip-plus-check.json")
    args = p.parse_args(argv)
    from bench.quality.__main__ import _engine_config
    from bench.quality.__main__ import parse as grid_parse
    from service.engine.kvzip_engine import KVzipEngine

    torch.set_num_threads(1)
    engine = KVzipEngine.load(_engine_config(grid_parse([])))
    model64 = float64_copy(engine.model)
    ratios = [float(r) for r in args.ratios.split(",")]
    data = json.loads(args.results.read_text()) if args.results.exists() else {}
    data.setdefault("rows", [])
    data.setdefault("numerics", {})
    data.setdefault("seconds", {})
    data.setdefault("tasks", {})
    for task in needle_grid.grid_tasks(engine, args.haystacks, dev=True):
        if task.name in data["numerics"]:
            continue
        numerics, ref = compare(engine, model64, task)
        methods: dict[str, needle_grid.Method] = {"kvzip": "kvzip", "kvzip_plus": "kvzip_plus"}
        methods |= {f"ref {v}": Fixed(ref[v]) for v in args.variants.split(",")}
        rows, seconds = needle_grid.run_task(engine, task, methods, ratios)
        data["rows"] += rows
        data["numerics"][task.name] = numerics
        data["seconds"][task.name] = seconds
        data["tasks"][task.name] = task.meta
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(data, indent=1))
        needle_grid._log(f"{task.name}: {numerics}")
    print(needle_report.accuracy_table(data["rows"]))
    print(needle_report.paired_table(data["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
