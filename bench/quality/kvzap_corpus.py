"""`python -m bench.quality.kvzap_corpus`: how much calibration text the KVzap predictor
needs, which target transform ranks better, and what the fitted predictors do to needles.

1. Pack ~1,000-token texts from the articles no needle haystack or head calibration reads
   (KVZAP_ARTICLES); the texts of the last HELD_ARTICLES of them are held out whole.
2. Score every text once (`calibration.collect`, the service's own `--target` scorer; the
   samples are cached under bench/.cache/ so a rerun only refits).
3. For each corpus size k: fit the ridge predictor on the first k training texts, with
   rank-normal targets and with raw log-score targets, and measure on the held-out texts:
   R² (on each target's own scale), Spearman's rank correlation and the top-30% recall.
4. With --needles N: the predictors fitted on the whole corpus (ridge, rank and log;
   --mlp adds an MLP on rank targets) answer N dev haystacks next to `kvzip`
   (needle_grid.run_task); --store puts the rank ridge where the needle grid finds it.

    python -m bench.quality.kvzap_corpus --texts 72 --sizes 4,8,16,32,48,72 --needles 12 \
        --mlp --store
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.quality import needle_grid, needle_report
from bench.quality.data import load_articles
from service.compression.learned.calibration import (
    CalibrationSettings,
    Samples,
    _pack,
    collect,
    evaluate,
    stamped,
)
from service.compression.learned.fit import MLPSettings, fit_mlp, fit_ridge
from service.compression.learned.predictor import KVzapPredictor, predictor_path, save_predictor
from service.compression.scorers.kvzap import KVzapScorer

ROOT = Path(__file__).resolve().parents[2]
KVZAP_ARTICLES = slice(16, 42)  # disjoint from needle_grid's GRID / DEV / HEAD articles
HELD_ARTICLES = 2
CACHE = ROOT / "bench" / ".cache"


def texts(engine, tokens: int) -> tuple[list[str], list[str]]:  # type: ignore[no-untyped-def]
    """(training texts, held-out texts) of about `tokens` tokens each."""
    articles = load_articles()[KVZAP_ARTICLES]

    def packed(group: list[dict]) -> list[str]:
        out: list[str] = []
        for article in group:
            paragraphs = [p["context"] for p in article["paragraphs"]]
            counts = [len(engine.tokenizer.encode(p, add_special_tokens=False)) for p in paragraphs]
            out.extend(_pack(paragraphs, counts, tokens))
        return out

    train = packed(articles[:-HELD_ARTICLES])
    random.Random(0).shuffle(train)  # a corpus of k texts spans many articles
    return train, packed(articles[-HELD_ARTICLES:])


def samples(engine, train: list[str], held: list[str], settings, path: Path) -> Samples:  # type: ignore[no-untyped-def]
    """Scored samples of train + held texts (held ones last), cached at `path`."""
    if path.exists():
        cached = torch.load(path)
        return Samples(cached["x"], cached["y"], cached["text"], cached["log_y"])
    got = collect(engine, train + held, settings, bar=False, keep_dtype=torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": got.x, "y": got.y, "text": got.text, "log_y": got.log_y}, path)
    return got


def fitted(
    data: Samples, k: int, n_train: int, kind: str, target: str, mlp: MLPSettings
) -> tuple[KVzapPredictor, dict]:
    """Fit on the first k texts with `target` ("rank" | "log"); held-out metrics."""
    y = data.y if target == "rank" else data.log_y
    assert y is not None
    pick = Samples(data.x, y, data.text)
    train, held = pick.where(pick.text < k), pick.where(pick.text >= n_train)
    t0 = time.perf_counter()
    linear = kind == "linear"
    predictor = fit_ridge(train.x, train.y) if linear else fit_mlp(train.x, train.y, mlp)
    meta = evaluate(predictor, train, held)
    meta["fit_s"] = round(time.perf_counter() - t0, 1)
    return predictor.with_meta(**meta), meta


def main(argv: list[str] | None = None) -> int:
    from bench.quality.__main__ import _engine_config
    from bench.quality.__main__ import parse as grid_parse
    from service.engine.kvzip_engine import KVzipEngine

    p = argparse.ArgumentParser(prog="python -m bench.quality.kvzap_corpus")
    p.add_argument("--texts", type=int, default=72, help="training texts at most")
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--sizes", default="4,8,16,32,64")
    p.add_argument("--target", default="kvzip", choices=("kvzip", "kvzip_plus"))
    p.add_argument("--needles", type=int, default=0, help="dev haystacks for the needle check")
    p.add_argument("--mlp", action="store_true", help="also an MLP (rank targets) in the check")
    p.add_argument("--store", action="store_true", help="store the rank ridge for the grid")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/kvzap-corpus.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    engine = KVzipEngine.load(_engine_config(grid_parse([])))
    train_texts, held_texts = texts(engine, args.tokens)
    train_texts = train_texts[: args.texts]
    settings = CalibrationSettings(target=args.target)
    t0 = time.perf_counter()
    cache = CACHE / f"kvzap-corpus-{args.target}-{len(train_texts)}-{args.tokens}.pt"
    data = samples(engine, train_texts, held_texts, settings, cache)
    scoring_s = time.perf_counter() - t0
    n_train = len(train_texts)
    out: dict = {
        "settings": settings.describe_target(),
        "train_texts": n_train,
        "held_texts": len(held_texts),
        "scoring_s": round(scoring_s),
        "curve": [],
    }
    mlp = MLPSettings(hidden=128, epochs=8)
    for k in [int(x) for x in args.sizes.split(",") if int(x) <= n_train]:
        for target in ("rank", "log"):
            _, meta = fitted(data, k, n_train, "linear", target, mlp)
            row = {"texts": k, "target": target, "kind": "linear"} | {
                key: meta[key] for key in
                ("train_samples", "heldout_r2", "heldout_spearman", "heldout_top30_recall")
            }  # fmt: skip
            out["curve"].append(row)
            needle_grid._log(json.dumps(row))
    if args.needles:
        predictors = {f"kvzap {t}": fitted(data, n_train, n_train, "linear", t, mlp)[0]
                      for t in ("rank", "log")}  # fmt: skip
        if args.mlp:
            predictors["kvzap mlp rank"] = fitted(data, n_train, n_train, "mlp", "rank", mlp)[0]
        if args.store:
            rank = replace(settings, transform="rank")
            best = stamped({"linear": predictors["kvzap rank"]}, engine, n_train, rank)["linear"]
            save_predictor(predictor_path(CACHE / "kvzap", engine.identity, "linear"), best)
        methods: dict[str, needle_grid.Method] = {"kvzip": "kvzip"}
        methods |= {name: KVzapScorer(pr) for name, pr in predictors.items()}
        rows: list[dict] = []
        for task in needle_grid.grid_tasks(engine, args.needles, dev=True):
            got, _ = needle_grid.run_task(engine, task, methods, needle_grid.RATIOS)
            rows += got
            needle_grid._log(f"needles {task.name}")
        out["needle_rows"] = rows
        print(needle_report.accuracy_table(rows))
        print(needle_report.paired_table(rows))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
