"""`python -m bench.quality`: the quality grid, its tables, its plot (docs/quality.md).

Full run (the default grid; about an hour on 2 CPU cores, minutes with --device cuda):

    python -m bench.quality

Quick run (under 5 minutes on 2 cores; writes under bench/.cache/quality-quick/):

    python -m bench.quality --quick

Every grid setting is a flag; the exact command line is recorded in the output.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["kvzip", "kvzip_plus", "kvzip_head", "streaming", "snapkv", "h2o"]
FULL_GRID = {
    "qa_docs": 2,
    "doc_tokens": 3000,
    "max_questions": 15,
    "needle_lengths": "1000,3000,7000",
    "needle_depths": "0,0.5,1",
    "ratios": "1,0.5,0.3,0.2,0.1",
    "kvpress": True,
    "calibration_paragraphs": 12,
}
QUICK_GRID = {
    "qa_docs": 1,
    "doc_tokens": 700,
    "max_questions": 3,
    "needle_lengths": "1000",
    "needle_depths": "0.2,0.6",
    "ratios": "1,0.3,0.1",
    "kvpress": False,
    "calibration_paragraphs": 3,
}
MAX_NEW = {"qa": 16, "needle": 12}  # new tokens per answer (SQuAD answers are short)
CALIBRATION_ARTICLES = slice(-2, None)  # head-level calibration: articles no task uses


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the small grid (a few minutes)")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="re-render the markdown section and the plot from --results, running nothing",
    )
    p.add_argument("--model", default=None, help="HF id or local path (default: SmolLM2-135M)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (auto: cuda if present)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ratios", help=f"kept fractions (full: {FULL_GRID['ratios']})")
    p.add_argument("--qa-docs", type=int, help="SQuAD articles, one document each")
    p.add_argument("--doc-tokens", type=int, help="max tokens of a QA document")
    p.add_argument("--max-questions", type=int, help="questions per document (0: all)")
    p.add_argument("--needle-lengths", help="haystack sizes in tokens, comma separated")
    p.add_argument("--needle-depths", help="needle depths in [0, 1], comma separated")
    p.add_argument("--kvpress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--kvpress-ratios", help="ratios for kvpress (default: --ratios)")
    p.add_argument("--calibration-paragraphs", type=int, help="kvzip_head: paragraphs per text")
    p.add_argument(
        "--kvzap-texts", type=int, default=24, help="kvzap: calibration texts (0: all there are)"
    )
    p.add_argument("--kvzap-tokens", type=int, default=4000, help="kvzap: tokens per text")
    p.add_argument(
        "--kvzap-positions",
        type=int,
        default=None,
        help="kvzap: sampled positions per calibration text (0: every position)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="grid worker processes on the one device (a launch-bound GPU answers several "
        "questions at once); QA documents are split into parts of --questions-per-unit",
    )
    p.add_argument("--kvpress-workers", type=int, default=1, help="kvpress peer processes")
    p.add_argument("--questions-per-unit", type=int, default=4, help="with --workers > 1")
    p.add_argument(
        "--deadline-min",
        type=float,
        default=None,
        help="stop workers and peers this many minutes after the start and report the "
        "documents they finished (only with --workers > 1)",
    )
    p.add_argument("--out", type=Path, help="markdown file whose bench section is rewritten")
    p.add_argument("--plot", type=Path, help="PNG plot path")
    p.add_argument("--results", type=Path, help="raw results JSON path")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default). 1 by default: on a shared 2-core machine "
        "two threads were 4x SLOWER than one (OpenMP workers descheduled by other load)",
    )
    args = p.parse_args(argv)
    grid = QUICK_GRID if args.quick else FULL_GRID
    for key, value in grid.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.kvpress_ratios is None:
        args.kvpress_ratios = args.ratios
    cache = ROOT / "bench" / ".cache" / "quality-quick"
    args.out = args.out or (cache / "quality.md" if args.quick else ROOT / "docs" / "quality.md")
    args.plot = args.plot or args.out.with_suffix(".png")
    args.results = args.results or (
        cache / "results.json" if args.quick else ROOT / "bench" / "quality" / "results.json"
    )
    return args


def _engine_config(args, device: str = "cpu"):  # type: ignore[no-untyped-def]
    from bench.quality.kvzap import CACHE
    from service.config import DEFAULT_MODEL, EngineConfig

    return EngineConfig(
        model=args.model or DEFAULT_MODEL,
        gguf_file=args.gguf_file,
        device=device,
        dtype=args.dtype,
        head_scores_dir=ROOT / "bench" / ".cache" / "head_scores",
        kvzap_dir=CACHE,
    )


def build_tasks(engine, args):  # type: ignore[no-untyped-def]
    from bench.quality.data import load_articles, needle_tasks, qa_tasks

    articles = load_articles()

    def count(text: str) -> int:
        return len(engine.tokenizer.encode(text, add_special_tokens=False))

    qa = qa_tasks(articles, count, args.doc_tokens, args.qa_docs, args.max_questions)
    hay = articles[args.qa_docs : CALIBRATION_ARTICLES.start or None]
    needles = needle_tasks(
        hay, count, [int(x) for x in _floats(args.needle_lengths)], _floats(args.needle_depths)
    )
    calibration = [
        "\n\n".join(p["context"] for p in a["paragraphs"][:12])
        for a in articles[CALIBRATION_ARTICLES]
    ]
    return qa, needles, calibration


def _prepare_kvzap(engine, args, methods, tasks) -> str:  # type: ignore[no-untyped-def]
    """kvzap.prepare with this run's settings (predictors for the kvzap methods, if any)."""
    from bench.quality import kvzap

    return kvzap.prepare(
        engine,
        methods,
        tasks,
        args.qa_docs,
        args.kvzap_texts,
        args.kvzap_tokens,
        positions=args.kvzap_positions,
    )


def render(args: argparse.Namespace) -> int:
    """Tables and plot from a saved run (results JSON), without running anything."""
    from bench.quality import report

    data = json.loads(args.results.read_text(encoding="utf-8"))
    section = report.markdown(data["rows"], data["timings"], data["kvpress"], data["header"])
    report.write_markdown(args.out, section)
    report.plot(data["rows"], args.plot, data.get("title", "accuracy vs kept ratio"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.render_only:
        return render(args)
    import torch

    from bench.quality import report
    from bench.quality.runner import Grid, _log
    from service.compression.scorers.kvzip_head import calibrate, save_head_scores
    from service.engine.kvzip_engine import KVzipEngine
    from service.engine.prompt import INSTRUCTION

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    engine = KVzipEngine.load(_engine_config(args, device.replace("auto", "cpu")))
    qa, needles, calibration = build_tasks(engine, args)
    methods = [m for m in args.methods.split(",") if m]
    if "kvzip_head" in methods:
        t0 = time.perf_counter()
        heads = calibrate(engine, calibration)
        save_head_scores(engine.config.head_scores_dir, engine.identity, heads)
        _log(
            f"kvzip_head calibrated on {len(calibration)} texts in {time.perf_counter() - t0:.1f}s"
        )
    if args.workers > 1:
        rows, timings, peer_timings, peer_meta, kvzap_line, coverage = run_parallel(
            engine, args, methods, qa, needles, INSTRUCTION, started
        )
    else:
        kvzap_line = _prepare_kvzap(engine, args, methods, qa + needles)
        peer = start_kvpress(engine, args, qa + needles, INSTRUCTION) if args.kvpress else None
        grid = Grid(engine, methods, _floats(args.ratios), MAX_NEW)
        grid.run(qa + needles)
        data = grid.to_json()
        peer_rows: list[dict] = []
        peer_timings: list[dict] = []
        peer_meta: dict = {}
        if peer is not None:
            _log("waiting for the kvpress peer")
            peer_rows, peer_timings, peer_meta = kvpress_rows(peer.join(), qa + needles)
        rows, timings, coverage = data["rows"] + peer_rows, data["timings"], ""
    data = {"timings": timings}
    elapsed = time.perf_counter() - started
    header = _header(args, argv, engine, qa, needles, elapsed, peer_meta)
    header += f"\n{kvzap_line}" if kvzap_line else ""
    header += f"\n{coverage}" if coverage else ""
    args.results.parent.mkdir(parents=True, exist_ok=True)
    title = f"{engine.identity.name}, {device}: accuracy and fidelity vs kept ratio"
    saved = {
        "rows": rows,
        "timings": data["timings"],
        "kvpress": peer_timings,
        "header": header,
        "title": title,
    }
    args.results.write_text(json.dumps(saved, indent=1))
    report.write_markdown(args.out, report.markdown(rows, data["timings"], peer_timings, header))
    report.plot(rows, args.plot, title)
    _log(f"done in {elapsed / 60:.1f} min -> {args.out}, {args.plot}, {args.results}")
    return 0


def run_parallel(engine, args, methods, qa, needles, instruction, started):  # type: ignore[no-untyped-def]
    """The grid on `--workers` processes and kvpress on `--kvpress-workers`, kvzap calibrated
    here meanwhile; with --deadline-min, only the documents (parts) finished in time.

    Returns rows, timings, peer timings, peer meta, the kvzap header line, a coverage line.
    """
    from bench.quality import kvzap
    from bench.quality.parallel import Pool, base_name, shards, split_questions
    from bench.quality.runner import _log

    units = split_questions(qa, args.questions_per_unit) + needles
    run_start = time.time() - (time.perf_counter() - started)
    deadline = None if args.deadline_min is None else run_start + 60 * args.deadline_min
    peers = []
    if args.kvpress:
        for shard in shards(units, args.kvpress_workers):
            peers.append(start_kvpress(engine, args, shard, instruction))
    job = {
        "engine_config": _engine_config(args, str(engine.model.device)),
        "threads": args.threads,
        "methods": methods,
        "ratios": _floats(args.ratios),
        "max_new": MAX_NEW,
    }
    pool = Pool(job, units, args.workers, ROOT / "bench" / ".cache" / "quality-workers")
    _log(f"{len(pool.procs)} workers on {len(units)} units, {len(peers)} kvpress peers")
    kvzap_line = ""
    try:
        kvzap_line = _prepare_kvzap(engine, args, methods, qa + needles)
        pool.signal(True)
    except Exception as exc:  # noqa: BLE001 - the rest of the grid still reports
        _log(f"kvzap calibration failed: {exc!r}")
        pool.signal(False)
        kvzap_line = f"- kvzap: calibration failed ({exc!r}); no kvzap rows."
    all_done = pool.wait(deadline)
    out = pool.results()
    _log(f"workers {'finished' if all_done else 'stopped at the deadline'}: {out['done']}")
    peer_out: dict = {"meta": {}, "results": []}
    for peer in peers:
        part, finished = peer.finish(deadline)
        _log(f"kvpress peer {'finished' if finished else 'stopped'}: {len(part['results'])}")
        peer_out["meta"] = part["meta"] or peer_out["meta"]
        peer_out["results"] += part["results"]
    n_ratios = len(_floats(args.kvpress_ratios))
    peer_done = {
        name
        for name in {r["task"] for r in peer_out["results"]}
        if sum(r["task"] == name for r in peer_out["results"]) == n_ratios
    }
    plain = set(out["done"]["plain"])
    keep = plain & peer_done if peers else plain
    learned = keep & set(out["done"]["kvzap"])
    rows = [
        r for r in out["rows"] if r["task"] in (learned if kvzap.is_kvzap(r["method"]) else keep)
    ]
    timings = [t for t in out["timings"] if t["task"] in keep]
    peer_out["results"] = [r for r in peer_out["results"] if r["task"] in keep]
    peer_rows, peer_timings, peer_meta = kvpress_rows(peer_out, units) if peers else ([], [], {})
    for r in rows + peer_rows:
        r["task"] = base_name(r["task"])
    for t in timings + peer_timings:
        t["task"] = base_name(t["task"])
    n_q = lambda names: sum(len(u.questions) for u in units if u.name in names)  # noqa: E731
    has_kvzap = any(kvzap.is_kvzap(m) for m in methods)
    coverage = (
        f"- Run: {len(pool.procs)} grid worker processes and {len(peers)} kvpress processes "
        f"on the one device, {len(units)} units (QA documents in parts of at most "
        f"{args.questions_per_unit} questions, each part compressing the whole document; "
        "needles whole). "
        + (
            f"Deadline {args.deadline_min:g} min: "
            if args.deadline_min is not None
            else "No deadline: "
        )
        + f"{len(keep)} of {len(units)} units ({n_q(keep)} of {n_q({u.name for u in units})} "
        "questions) finished by every side and are in the tables"
        + (
            f"; the kvzap rows cover {len(learned)} units ({n_q(learned)} questions)"
            if has_kvzap
            else ""
        )
        + ". Times in the ingest table were taken with all these processes sharing the device."
    )
    return rows + peer_rows, timings, peer_timings, peer_meta, kvzap_line, coverage


def start_kvpress(engine, args, tasks, instruction):  # type: ignore[no-untyped-def]
    """Start kvpress KVzipPress on the same tasks in its own process (see kvpress_env)."""
    from bench.quality import kvpress_env
    from service.engine.loading import resolve_source

    source = resolve_source(_engine_config(args))
    tok_dir = kvpress_env.save_tokenizer(
        engine.tokenizer, ROOT / "bench" / ".cache" / "kvpress-tokenizer"
    )
    probe = "Line 1:\n\n  the orchard — keeps apples.\nQ?"
    job = {
        "model_dir": source.path,
        "gguf_file": source.gguf_file,
        "tokenizer_dir": str(tok_dir),
        "device": str(engine.model.device),
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "probe_text": probe,
        "probe_ids": engine.tokenizer.encode(probe, add_special_tokens=False),
        "instruction": instruction,
        "ratios": _floats(args.kvpress_ratios),
        "max_new": MAX_NEW,
        "threads": args.threads,
        "tasks": [
            {
                "name": t.name,
                "kind": t.kind,
                "text": t.text,
                "questions": [{"id": q.id, "text": q.text} for q in t.questions],
            }
            for t in tasks
        ],
    }
    return kvpress_env.Peer(job)


def kvpress_rows(out, tasks):  # type: ignore[no-untyped-def]
    """The peer's answers scored like ours (agreement: against its own no-press answers)."""
    from bench.quality import metrics

    by_name = {t.name: t for t in tasks}
    full_answers = {r["task"]: r["answers"] for r in out["results"] if r["ratio"] >= 1.0}
    rows, timings = [], []
    for res in out["results"]:
        task = by_name[res["task"]]
        timings.append(
            {
                "task": task.name,
                "kind": task.kind,
                "ratio": res["ratio"],
                "ingest_s": res["ingest_s"],
                "prompt_tokens": res["prompt_tokens"],
            }
        )
        reference = full_answers.get(task.name, [None] * len(task.questions))
        for q, answer, ref in zip(task.questions, res["answers"], reference, strict=True):
            if task.kind == "needle":
                score = em = metrics.needle_hit(answer, q.answers[0])
            else:
                score = metrics.best(metrics.f1, answer, q.answers)
                em = metrics.best(metrics.exact, answer, q.answers)
            rows.append(
                {
                    "task": task.name,
                    "kind": task.kind,
                    "method": "kvpress KVzipPress",
                    "ratio": res["ratio"],
                    "qid": q.id,
                    "answer": answer,
                    "score": score,
                    "em": em,
                    "agree": None if ref is None else float(answer.strip() == ref.strip()),
                    "kl": None,
                    "flips": None,
                    "positions": 0,
                }
            )
    return rows, timings, out["meta"]


def _header(args, argv, engine, qa, needles, elapsed, peer_meta) -> str:  # type: ignore[no-untyped-def]
    import torch
    import transformers

    command = "python -m bench.quality " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    qa_q = sum(len(t.questions) for t in qa)
    qa_tokens = [len(engine.tokenizer.encode(t.text, add_special_tokens=False)) for t in qa]
    docs = ", ".join(f"{t.name} {n} tokens" for t, n in zip(qa, qa_tokens, strict=True))
    lines = [
        "## Results",
        f"Generated by `{command.strip()}` in {elapsed / 60:.1f} minutes "
        f"({time.strftime('%Y-%m-%d')}).",
        "",
        f"- Model: {engine.identity.name} ({engine.model.dtype}, {engine.model.device}); "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{platform.machine()} with {torch.get_num_threads()} threads.",
        f"- QA: {len(qa)} documents ({docs}), "
        f"{qa_q} questions, each asked against one compressed cache per (method, ratio); "
        f"greedy, at most {MAX_NEW['qa']} new tokens.",
        f"- Needles: {len(needles)} haystacks, lengths {args.needle_lengths} tokens x depths "
        f"{args.needle_depths}; greedy, at most 12 new tokens; a hit is the 5-digit key in "
        "the answer.",
        f"- Methods: {args.methods}; ratios {args.ratios} (1 = the full cache, the same for "
        "every method).",
    ]
    if peer_meta:
        lines.append(
            f"- Peer: kvpress {peer_meta.get('kvpress')} KVzipPress (transformers "
            f"{peer_meta.get('transformers')}, its own environment), ratios {args.kvpress_ratios} "
            "(compression_ratio = 1 - ratio), as shipped: its 4 sink tokens are the only "
            "protected prefix."
        )
    else:
        lines.append("- Peer: kvpress not run in this invocation.")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
