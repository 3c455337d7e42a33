"""`python -m bench.quality.needle_grid`: generated needle haystacks, every method x ratio.

The haystacks (bench/quality/needles.py) hold two facts each; every document is prefilled
once, scored once per method and re-selected per ratio (pure selection), and both of its
questions are asked against each compressed cache. Results go to a JSON file after every
haystack, so a run that is stopped resumes where it was (`--results` again); the markdown
section of docs/quality.md is rendered from that file (bench/quality/needle_report.py).

Greedy answers are computed fast but exactly (up to float rounding): the full cache's
answer is teacher-forced under the compressed cache in one forward; where every argmax
agrees the greedy answer is that answer, otherwise greedy decoding resumes from the first
token whose argmax differs. An answer ends at its first 5-digit number or sentence end
(`needles.first_answer`); a hit is the key in it.

`--quantizations none,fp8,int4` also asks each selection stored with that
`compression.quantization` (service.codec, encoded and decoded back as a load does, in fp32)
under the method's label + "+fp8" / "+int4", so it is paired with the unquantized cache of
the same selection.

    python -m bench.quality.needle_grid --haystacks 32 --results bench/results/needles.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from bench.quality.data import Task, load_articles
from bench.quality.needles import answered, first_answer, haystacks
from bench.quality.runner import teacher_forced
from service import codec
from service.compression.scorers import Scorer
from service.compression.selection import select
from service.config import QUANTIZATIONS, CompressionConfig
from service.engine.kvcache import CompressedContext
from service.engine.kvzip_engine import KVzipEngine
from service.types import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("kvzip", "kvzip_plus", "kvzip_head", "kvzap", "streaming", "snapkv", "h2o")
RATIOS = (0.5, 0.3, 0.2, 0.1)
MAX_NEW = 20
GRID_ARTICLES = slice(0, 8)  # haystack sentences of the reported grid
DEV_ARTICLES = slice(8, 16)  # haystacks for choosing settings (never the reported grid's)
HEAD_ARTICLES = slice(42, 44)  # kvzip_head calibration text
Method = str | Scorer


def _log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


@torch.inference_mode()
def greedy_answer(
    engine: KVzipEngine, ctx: CompressedContext, prompt: list[int], forced: list[int]
) -> str:
    """The greedy answer under `ctx` (see the module docstring), given the full cache's
    answer token ids `forced`."""
    if forced:
        logits = teacher_forced(engine, ctx, prompt, forced)  # (len + 1, V)
        best = logits.argmax(dim=-1)
        differs = (best[: len(forced)] != torch.tensor(forced)).nonzero()
        if len(differs):
            first = int(differs[0])
            forced = forced[:first] + [int(best[first])]
        else:
            text = engine.decode(forced)
            if answered(text) or int(best[-1]) in engine.eos_ids:
                return text
            forced = forced + [int(best[-1])]
    head = prompt + forced
    params = SamplingParams(max_new_tokens=max(1, MAX_NEW - len(forced)))

    def tokens() -> Iterator[int]:
        yield from forced
        if not forced or forced[-1] not in engine.eos_ids:
            yield from engine.generate(ctx, head, params)

    return first_answer(tokens(), engine.decode)


def full_answer(engine: KVzipEngine, ctx: CompressedContext, prompt: list[int]) -> list[int]:
    """The full cache's greedy answer ids (ended like `first_answer`)."""
    ids: list[int] = []

    def tokens() -> Iterator[int]:
        for token in engine.generate(ctx, prompt, SamplingParams(max_new_tokens=MAX_NEW)):
            ids.append(token)
            yield token

    first_answer(tokens(), engine.decode)
    return ids


def stored(engine: KVzipEngine, ctx: CompressedContext, quantization: str) -> CompressedContext:
    """`ctx` as a load gives it back after storing it with `quantization` (fp32, CPU)."""
    if quantization == "none":
        return ctx
    blob = codec.encode(ctx, engine.identity, quantization, codec.DEFAULT_GROUP_SIZE)
    ids = codec.prefix_ids(blob)
    prefix = engine.prefix_context(ids) if ids else None
    return codec.decode(blob, engine.identity, "cpu", torch.float32, prefix)


def run_task(
    engine: KVzipEngine,
    task: Task,
    methods: dict[str, Method],
    ratios: Sequence[float],
    quantizations: Sequence[str] = ("none",),
) -> tuple[list[dict], dict[str, float]]:
    """Rows of one haystack (full cache + every method x ratio x quantization) and the
    scoring seconds."""
    doc = engine.encode_document(task.text)
    t0 = time.perf_counter()
    full = engine.prefill_context(doc, CompressionConfig("kvzip", 1.0, 2000))
    seconds = {"prefill": time.perf_counter() - t0}
    prompts = [engine.encode_question(q.text) for q in task.questions]
    forced = [full_answer(engine, full, p) for p in prompts]
    rows = []

    def add(method: str, ratio: float, q_index: int, answer: str) -> None:
        q = task.questions[q_index]
        rows.append(
            {
                "task": task.name,
                "method": method,
                "ratio": ratio,
                "qid": q.id,
                "answer": answer,
                "hit": float(q.answers[0] in answer),
            }
        )

    for i, ids in enumerate(forced):
        add("full", 1.0, i, engine.decode(ids))
    for label, method in methods.items():
        t0 = time.perf_counter()
        scored = engine.score(full, method=method)
        seconds[label] = time.perf_counter() - t0
        for ratio in ratios:
            selected = select(scored, ratio)
            for q in quantizations:
                ctx, name = stored(engine, selected, q), label if q == "none" else f"{label}+{q}"
                for i, (p, f) in enumerate(zip(prompts, forced, strict=True)):
                    add(name, ratio, i, greedy_answer(engine, ctx, p, f))
    return rows, seconds


def run(
    engine: KVzipEngine,
    tasks: list[Task],
    methods: dict[str, Method],
    ratios: Sequence[float],
    results: Path,
    header: dict,
    quantizations: Sequence[str] = ("none",),
) -> dict:
    """Every task not yet in `results` (resumed), saving after each one."""
    data = json.loads(results.read_text()) if results.exists() else {}
    data.setdefault("rows", [])
    data.setdefault("seconds", {})
    data.setdefault("tasks", {})
    data["header"] = header
    for task in tasks:
        if task.name in data["seconds"]:
            continue
        t0 = time.perf_counter()
        rows, seconds = run_task(engine, task, methods, ratios, quantizations)
        data["rows"] += rows
        data["seconds"][task.name] = seconds
        data["tasks"][task.name] = task.meta
        results.parent.mkdir(parents=True, exist_ok=True)
        tmp = results.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(results)
        hits = sum(r["hit"] for r in rows if r["method"] == "full")
        _log(f"{task.name} ({task.meta['tokens']} tokens, full {hits:g}/2): "
             f"{time.perf_counter() - t0:.0f}s")  # fmt: skip
    return data


def grid_tasks(
    engine: KVzipEngine,
    n: int,
    dev: bool = False,
    lengths: tuple[int, int] = (500, 1500),
    seed: int = 16,
) -> list[Task]:
    """The reported grid's haystacks (or, dev=True, the ones settings are chosen on)."""
    articles = load_articles()[DEV_ARTICLES if dev else GRID_ARTICLES]

    def count(text: str) -> int:
        return len(engine.tokenizer.encode(text, add_special_tokens=False))

    return haystacks(articles, count, n, lengths, seed + (1000 if dev else 0))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality.needle_grid")
    p.add_argument("--haystacks", type=int, default=32)
    p.add_argument("--dev", action="store_true", help="the dev haystacks, not the grid's")
    p.add_argument("--lengths", default="500,1500", help="haystack tokens: min,max")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    p.add_argument(
        "--quantizations", default="none", help="stored quantizations asked too: none,fp8,int4"
    )
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/needle-grid.json")
    p.add_argument("--out", type=Path, help="markdown file whose needle-grid section is rewritten")
    p.add_argument("--render-only", action="store_true")
    p.add_argument(
        "--section", default="needle-grid", help="the <!-- bench:SECTION:begin/end --> of --out"
    )
    p.add_argument("--shard", default="0/1", help="i/n: run haystacks i, i+n, ... only")
    p.add_argument("--merge", default="", help="more results files rendered with --results")
    p.add_argument("--kvzap-dir", type=Path, default=ROOT / "bench/.cache/kvzap")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.quality import needle_report
    from bench.quality.__main__ import _engine_config
    from bench.quality.__main__ import parse as grid_parse
    from service.compression.scorers.kvzip_head import calibrate, save_head_scores

    args = parse(argv)
    if not args.render_only:
        torch.set_num_threads(args.threads)
        config = _engine_config(grid_parse([]))
        engine = KVzipEngine.load(config).with_config(kvzap_dir=args.kvzap_dir)
        methods = [m for m in args.methods.split(",") if m]
        if "kvzip_head" in methods:
            texts = ["\n\n".join(p["context"] for p in a["paragraphs"][:12])
                     for a in load_articles()[HEAD_ARTICLES]]  # fmt: skip
            save_head_scores(config.head_scores_dir, engine.identity, calibrate(engine, texts))
        command = "python -m bench.quality.needle_grid " + " ".join(argv or sys.argv[1:])
        header = {"command": command, "model": engine.identity.name,
                  "threads": args.threads, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        ratios = [float(r) for r in args.ratios.split(",")]
        low, high = (int(x) for x in args.lengths.split(","))
        shard, shards = (int(x) for x in args.shard.split("/"))
        tasks = grid_tasks(engine, args.haystacks, args.dev, (low, high))[shard::shards]
        quantizations = [q for q in args.quantizations.split(",") if q]
        unknown = set(quantizations) - set(QUANTIZATIONS)
        if unknown:
            raise SystemExit(f"unknown quantizations {sorted(unknown)}; use {QUANTIZATIONS}")
        run(engine, tasks, {m: m for m in methods}, ratios, args.results, header, quantizations)
    if args.out:
        files = [args.results] + [Path(f) for f in args.merge.split(",") if f]
        data = needle_report.merged([json.loads(f.read_text()) for f in files])
        section = args.section
        needle_report.write(args.out, needle_report.markdown(data, section), section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
