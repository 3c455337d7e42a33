"""`kvzap` in the quality bench: calibration on articles no task reads, the method labels, and
two measurements of its own.

Grid labels: `kvzap-linear` and `kvzap-mlp` are method `kvzap` with the ridge or the MLP
predictor (`kvzap` alone: the MLP). Each document is INGESTED with method kvzap (scores
predicted inside its own prefill, ratio 1.0, then re-selected per ratio like every method),
so the grid's ingest-time row is the real kvzap ingest: its "prefill" column is the shared
plain prefill, its "scoring" column the kvzap ingest minus that.

    python -m bench.quality.kvzap targets [--device cuda] ...   which training target predicts
        the service's scores better: the KVzap recipe (~1,000-token texts, one softmax over
        the whole sequence) or the service's own chunked scores of longer texts
    python -m bench.quality.kvzap timing --predictors DIR ...   CPU ingest time of kvzap
        (linear, MLP) and kvzip, each ÷ the plain prefill of the same document
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.quality.data import Task, _sentences, load_articles
from service.compression.learned.calibration import (
    CalibrationSettings,
    collect,
    fit,
    split,
    stamped,
)
from service.compression.learned.fit import predict_all, r2_score
from service.compression.learned.predictor import (
    KVzapPredictor,
    load_predictor,
    predictor_path,
    save_predictor,
)
from service.compression.scorers.kvzap import predictor_dir
from service.config import CompressionConfig

if TYPE_CHECKING:
    from service.engine.kvcache import CompressedContext
    from service.engine.kvzip_engine import Document, KVzipEngine

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"kvzap": None, "kvzap-linear": "linear", "kvzap-mlp": "mlp"}
CACHE = ROOT / "bench" / ".cache" / "kvzap"


def is_kvzap(method: str) -> bool:
    return method in LABELS


def _log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# --- calibration texts that no task reads ----------------------------------------------------


def free_articles(articles: list[dict], tasks: list[Task], skip: int) -> list[dict]:
    """Articles after the first `skip` (the QA documents) none of whose sentences appears
    in any task text (needle haystacks are cut from other articles' sentences)."""
    used = set()
    for task in tasks:
        used.update(s.strip() for s in task.text.replace("\n", " ").split(". "))
    free = []
    for article in articles[skip:]:
        sentences = {s.rstrip(".").strip() for s in _sentences([article])}
        if not any(s in used or s + "." in used for s in sentences):
            free.append(article)
    return free


def pack(articles: list[dict], engine: KVzipEngine, tokens: int, limit: int) -> list[str]:
    """~`tokens`-token texts of consecutive paragraphs, from the LAST articles backwards."""
    from service.compression.learned.calibration import _pack

    out: list[str] = []
    for article in reversed(articles):
        paragraphs = [p["context"] for p in article["paragraphs"]]
        counts = [len(engine.tokenizer.encode(p, add_special_tokens=False)) for p in paragraphs]
        out.extend(_pack(paragraphs, counts, tokens))
        if len(out) >= limit:
            break
    return out[:limit]


def prepare(
    engine: KVzipEngine,
    methods: list[str],
    tasks: list[Task],
    qa_docs: int,
    texts: int = 24,
    tokens: int = 4000,
    positions: int | None = None,
) -> str:
    """Calibrate both predictors once (on free articles) into the engine's kvzap store
    (`predictor_dir(engine)`: CACHE for the bench's engines); a header line.

    tokens 4000: the defaults of `kvzip calibrate-scorer` (chunks of 2,000, 2,000 positions
    per text); tokens 1000: the KVzap recipe (one softmax per text, 500 positions).
    texts 0: every text the free articles give. positions: sampled positions per text
    (None: the settings' default; 0: every position of every text). On a GPU the fit runs
    there too (the samples are moved to the device; hidden states are kept in the model's
    dtype until then, which loses nothing: the model computed them in it).
    """
    if not any(is_kvzap(m) for m in methods):
        return ""
    free = free_articles(load_articles(), tasks, qa_docs)
    calibration = pack(free, engine, tokens, texts or 10**9)
    settings = CalibrationSettings()
    if tokens <= 1000:
        settings = replace(settings, chunk_size=None, tokens_per_text=500)
    if positions is not None:
        settings = replace(settings, tokens_per_text=positions or 10**9)
    t0 = time.perf_counter()
    fitted = _calibrate(engine, calibration, settings)
    for kind, predictor in fitted.items():
        save_predictor(predictor_path(predictor_dir(engine), engine.identity, kind), predictor)
    spent = time.perf_counter() - t0
    r2 = ", ".join(f"{k} {p.meta['heldout_r2']}" for k, p in fitted.items())
    n_train = int(next(iter(fitted.values())).meta["train_samples"])
    n_held = int(next(iter(fitted.values())).meta["heldout_samples"])
    n_tokens = sum(len(engine.tokenizer.encode(t, add_special_tokens=False)) for t in calibration)
    _log(f"kvzap calibrated on {len(calibration)} texts in {spent:.1f}s; held-out R² {r2}")
    per_text = (
        "every position of each text"
        if settings.tokens_per_text >= 10**9
        else f"{settings.tokens_per_text} positions per text"
    )
    losses = "; ".join(
        f"{k}: training MSE {p.meta['train_loss']}, held-out MSE {p.meta.get('heldout_loss')}"
        for k, p in fitted.items()
    )
    return (
        f"- kvzap: predictors fitted on {len(calibration)} texts of ~{tokens:,} tokens "
        f"({n_tokens:,} tokens) from {len(free)} articles no task reads (targets: "
        f"{settings.describe_target()}, {per_text}: {n_train:,} training samples, "
        f"{n_held:,} held out from the last 10% of the texts) in {spent:.0f} s on "
        f"{engine.model.device}; held-out R² of log-scores: {r2} ({losses})."
    )


def _calibrate(
    engine: KVzipEngine, texts: list[str], settings: CalibrationSettings
) -> dict[str, KVzapPredictor]:
    """`calibrate_scorer`, with the samples kept compact and the fit on the model's device."""
    from service.compression.learned.calibration import Samples

    keep_dtype = engine.model.dtype if engine.model.dtype != torch.float16 else torch.float32
    samples = collect(engine, texts, settings, bar=False, keep_dtype=keep_dtype)
    train, held = split(samples, settings.heldout)
    del samples
    device = engine.model.device
    if device.type != "cpu":
        train = Samples(train.x.to(device), train.y.to(device), train.text.to(device))
        held = Samples(held.x.to(device), held.y.to(device), held.text.to(device))
    fitted = fit(train, held, settings, bar=False)
    del train, held
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return stamped(fitted, engine, len(texts), settings)


def ingest_scored(
    engine: KVzipEngine, doc: Document, method: str, chunk_size: int
) -> CompressedContext:
    """The document ingested with kvzap at ratio 1.0 (scores kept for re-selection)."""
    labelled = engine.with_config(kvzap_kind=LABELS[method])
    ctx, _ = labelled.ingest(doc, CompressionConfig("kvzap", 1.0, chunk_size))
    return ctx


# --- which target predicts better ------------------------------------------------------------


def _top_recall(truth: torch.Tensor, pred: torch.Tensor, ratio: float) -> float:
    """Fraction of the true global top-`ratio` pairs that the predicted top-`ratio` keeps."""
    k = max(1, int(ratio * truth.numel()))
    a = set(truth.flatten().topk(k).indices.tolist())
    b = set(pred.flatten().topk(k).indices.tolist())
    return len(a & b) / k


def compare_targets(engine: KVzipEngine, args: argparse.Namespace) -> dict:
    """Fit on (A) ~1K-token texts, one softmax each (the KVzap recipe) and (B) ~4K-token
    texts in chunks of 2,000 (what `kvzip_plus` computes at ingest); evaluate both on
    held-out ~4K-token documents against the service's chunked kvzip_plus and kvzip scores."""
    from service.compression.scorers.kvzip import KVzipScorer
    from service.compression.scorers.kvzip_plus import KVzipPlusScorer

    articles = load_articles()
    test_articles, train_articles = articles[args.test_from :], articles[: args.test_from]
    train_articles = train_articles[args.skip :]
    short = pack(train_articles, engine, 1000, args.texts)
    long = pack(train_articles, engine, 4000, max(2, args.texts // 4))
    tests = pack(test_articles, engine, 4000, args.test_docs)
    _log(f"targets: {len(short)} short, {len(long)} long training texts, {len(tests)} test docs")
    base = CalibrationSettings(kinds=tuple(args.kinds.split(",")))
    settings = {
        "A: ~1K-token texts, one softmax": (
            short,
            replace(base, chunk_size=None, tokens_per_text=500),
        ),
        "B: ~4K-token texts, chunks of 2000": (
            long,
            replace(base, chunk_size=2000, tokens_per_text=2000),
        ),
    }
    truths = []
    for text in tests:
        doc = engine.encode_document(text)
        full = engine.prefill_context(doc, CompressionConfig("kvzip", 1.0, 2000))
        inputs = _inputs(engine, doc)
        plus = torch.stack(KVzipPlusScorer().score(engine, full)).float().cpu()  # (L, H, n)
        plain = torch.stack(KVzipScorer().score(engine, full)).float().cpu()
        truths.append((inputs, plus.clamp_min(1e-30).log(), plain.clamp_min(1e-30).log()))
    out: dict = {"tests": [t[0].shape[0] for t in truths]}
    for name, (texts, s) in settings.items():
        samples = collect(engine, texts, s)
        train, held = split(samples, s.heldout)
        for kind, predictor in fit(train, held, s).items():
            row = {"train_samples": train.x.shape[0], "heldout_r2": predictor.meta["heldout_r2"]}
            r2s, rec_plus, rec_plain = [], [], []
            for inputs, plus, plain in truths:
                pred = predict_all(predictor, inputs).permute(1, 2, 0)  # (L, H, n)
                r2s.append(r2_score(plus.permute(2, 0, 1), pred.permute(2, 0, 1)))
                rec_plus.append(_top_recall(plus, pred, 0.3))
                rec_plain.append(_top_recall(plain, pred, 0.3))
            row |= {
                "test_r2_vs_kvzip_plus": round(statistics.mean(r2s), 4),
                "test_top30_recall_kvzip_plus": round(statistics.mean(rec_plus), 4),
                "test_top30_recall_kvzip": round(statistics.mean(rec_plain), 4),
            }
            out[f"{name} / {kind}"] = row
            _log(f"{name} / {kind}: {row}")
    return out


def _inputs(engine: KVzipEngine, doc: Document) -> torch.Tensor:
    """(n, L, D) attention inputs of the context tokens of one plain prefill."""
    from service.engine.attention_hook import attention_inputs

    rec: dict[int, torch.Tensor] = {}
    with attention_inputs(engine.model, lambda i, x: rec.__setitem__(i, x[0].float().cpu())):
        engine.prefill_context(doc, CompressionConfig("kvzip", 1.0))
    n = len(doc.context_ids)
    return torch.stack([rec[i][-n:] for i in range(engine.n_layers)], dim=1)


# --- CPU ingest time ---------------------------------------------------------------------------


def timing(engine: KVzipEngine, args: argparse.Namespace) -> dict:
    """Median over `repeats` interleaved rounds of: plain prefill, kvzap ingest (each kind),
    kvzip ingest; per document length. Ratios are per round, then the median.

    --clock cpu (the default) times the process's CPU seconds (`time.process_time`): with one
    thread that is the work done, unaffected by other processes on a shared machine, which
    make wall-clock ratios swing by ±20% there. --clock wall times wall-clock seconds.
    """
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    engine = engine.with_config(kvzap_dir=Path(args.predictors))
    kinds = [k for k in ("linear", "mlp") if _stored(engine, k)]
    articles = load_articles()[args.skip :]
    out: dict = {
        "kinds": kinds,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "rows": [],
    }
    for length in args.lengths:
        text = pack(articles, engine, length, 1)[0]
        doc = engine.encode_document(text)
        rounds: dict[str, list[float]] = {"prefill": []}
        for _ in range(args.repeats):
            t0 = clock()
            engine.prefill_context(doc, CompressionConfig("none", 1.0))
            rounds["prefill"].append(clock() - t0)
            for kind in kinds:
                labelled = engine.with_config(kvzap_kind=kind)
                t0 = clock()
                labelled.ingest(doc, CompressionConfig("kvzap", 0.3))
                rounds.setdefault(f"kvzap-{kind}", []).append(clock() - t0)
            if args.kvzip:
                t0 = clock()
                engine.ingest(doc, CompressionConfig("kvzip", 0.3))
                rounds.setdefault("kvzip", []).append(clock() - t0)
        row = {"tokens": len(doc.context_ids), "prefill_s": statistics.median(rounds["prefill"])}
        for name, times in rounds.items():
            if name != "prefill":
                ratios = [t / p for t, p in zip(times, rounds["prefill"], strict=True)]
                row[f"{name}_s"] = statistics.median(times)
                row[f"{name}_x"] = round(statistics.median(ratios), 3)
        out["rows"].append(row)
        _log(f"timing {row}")
    return out


def _stored(engine: KVzipEngine, kind: str) -> bool:
    try:
        load_predictor(predictor_dir(engine), engine.identity, kind)
    except Exception:  # noqa: BLE001 - "not stored" is all we need to know
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    from service.config import EngineConfig
    from service.engine.kvzip_engine import KVzipEngine

    p = argparse.ArgumentParser(prog="python -m bench.quality.kvzap", description=__doc__)
    p.add_argument("command", choices=("targets", "timing"))
    p.add_argument("--model", default=None, help="model (default: the default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON results")
    p.add_argument("--texts", type=int, default=64, help="targets: short training texts")
    p.add_argument("--kinds", default="linear,mlp", help="targets: predictor kinds")
    p.add_argument("--skip", type=int, default=3, help="articles the QA bench uses (skipped)")
    p.add_argument("--test-from", type=int, default=-4, help="targets: test articles from")
    p.add_argument("--test-docs", type=int, default=4, help="targets: ~4K-token test docs")
    p.add_argument("--predictors", default=str(CACHE), help="timing: predictor folder")
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="timing: clock")
    p.add_argument("--kvzip", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(device=args.device, dtype=args.dtype)
    engine = KVzipEngine.load(replace(config, model=args.model) if args.model else config)
    result = compare_targets(engine, args) if args.command == "targets" else timing(engine, args)
    result["model"] = engine.identity.name
    result["device"] = str(engine.model.device)
    result["command"] = "python -m bench.quality.kvzap " + " ".join(argv or sys.argv[1:])
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
