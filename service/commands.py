"""`kvzip` command line: one-off operations on a model that do not need the HTTP service.

    kvzip calibrate --text FILE [--text FILE ...] [--model M] [--data-dir data]
    kvzip calibrate-scorer [--text FILE ...] [--texts 24] [--kind both] [--model M] ...
    kvzip calibrate-scorer --released DIR [--model M] [--data-dir data]

`calibrate` computes the per-head scores that compression method `kvzip_head` uses
(service.compression.scorers.kvzip_head) and stores them under <data-dir>/head_scores/, keyed by the
model's fingerprint, where the service (KVZIP_DATA_DIR) looks for them.

`calibrate-scorer` fits the KVzap predictors (linear and MLP) that method `kvzap` uses
(service.compression.learned) on the ranks of the model's own KVzip scores of calibration
texts (default: ~1,000-token texts from bench/data/squad_train_sample.jsonl) and stores
them, with their held-out R², rank correlation and top-30% recall, under <data-dir>/kvzap/
(`kvzip calibrate-scorer --help` says exactly what is fitted); `--released DIR` stores
NVIDIA's released checkpoint (nvidia/KVzap-*, downloaded beforehand) for the model instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from service.config import EngineConfig
from service.errors import ServiceError

CORPUS_TEXTS = 64
"""Default calibration texts of ~1,000 tokens: held-out rank correlation stopped improving
before this size on the default model (docs/quality.md, "kvzap")."""
CALIBRATE_SCORER_HELP = """\
Fit the per-layer predictors (ridge map and 2-layer MLP) that method kvzap applies inside
the prefill, and store them with their metrics under <data-dir>/kvzap/.

Target: the model's own KVzip pair scores (--target kvzip; kvzip_plus = with the KVzip+
weights), computed exactly as an ingest does, of texts of ~--tokens tokens. Each text's
log-scores are replaced by the normal scores of their ranks among the text's L*H*n pairs
(--transform rank; `log` keeps the raw log-scores, the KVzap recipe), and the text's last
--window tokens are left out (kept at ingest anyway). With rank targets, a threshold is on
the normal-score scale: 0 keeps about half the pairs, 1 about a quarter (predictions are
shrunk toward 0, so fewer than the top 1 - Phi(t)).

Metrics (on whole held-out texts, the last --heldout fraction): R² of the targets,
Spearman's rank correlation of predicted and true scores per text, and the share of the
true top-30% pairs the predicted top-30% keeps (what selection at ratio 0.3 uses); all in
the predictor's metadata and printed."""


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The model of the command line, with the service's paths under --data-dir."""
    data_dir = Path(args.data_dir)
    return EngineConfig(
        model=args.model,
        gguf_file=args.gguf_file,
        device=args.device,
        dtype=args.dtype,
        head_scores_dir=data_dir / "head_scores",
        kvzap_dir=data_dir / "kvzap",
    )


def _calibrate(args: argparse.Namespace) -> int:
    from service.compression.scorers.kvzip_head import calibrate, save_head_scores
    from service.engine.kvzip_engine import KVzipEngine

    engine = KVzipEngine.load(_engine_config(args))
    texts = [Path(p).read_text(encoding="utf-8") for p in args.text]
    heads = calibrate(engine, texts, args.chunk_size)
    path = save_head_scores(engine.config.head_scores_dir, engine.identity, heads)
    sys.stdout.write(f"head scores {tuple(heads.shape)} of {engine.identity.name} -> {path}\n")
    return 0


def _calibrate_scorer(args: argparse.Namespace) -> int:
    from service.compression.learned.calibration import (
        CalibrationSettings,
        calibrate_scorer,
        texts_from_jsonl,
    )
    from service.compression.learned.fit import MLPSettings
    from service.compression.learned.predictor import (
        KINDS,
        check_fits,
        predictor_path,
        save_predictor,
    )
    from service.compression.learned.released import load_released
    from service.compression.scorers.kvzap import predictor_dir
    from service.engine.kvzip_engine import KVzipEngine

    engine = KVzipEngine.load(_engine_config(args))
    identity, model = engine.identity, engine.model.config
    if args.released:
        predictor = load_released(args.released)
        check_fits(predictor, engine.n_layers, model.hidden_size, model.num_key_value_heads)
        fitted = {
            predictor.kind: predictor.with_meta(
                model=identity.name, model_fingerprint=identity.model_fingerprint
            )
        }
    else:
        if args.text:
            texts = [Path(p).read_text(encoding="utf-8") for p in args.text]
        else:
            texts = texts_from_jsonl(args.jsonl, engine.tokenizer, args.tokens, args.texts)
        settings = CalibrationSettings(
            target=args.target,
            chunk_size=args.chunk_size or None,
            tokens_per_text=args.tokens_per_text,
            heldout=args.heldout,
            transform=args.transform,
            window=args.window,
            kinds=KINDS if args.kind == "both" else (args.kind,),
            mlp=MLPSettings(hidden=args.hidden, epochs=args.epochs),
        )
        fitted = calibrate_scorer(engine, texts, settings)
    for kind, predictor in fitted.items():
        path = save_predictor(predictor_path(predictor_dir(engine), identity, kind), predictor)
        meta = predictor.meta
        sys.stdout.write(
            f"kvzap {kind} predictor of {identity.name} ({meta.get('target', 'released')}): "
            f"train loss {meta.get('train_loss', '-')}, held-out R² "
            f"{meta.get('heldout_r2', '-')}, Spearman {meta.get('heldout_spearman', '-')}, "
            f"top-30% recall {meta.get('heldout_top30_recall', '-')} -> {path}\n"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvzip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="compute the head scores of method kvzip_head")
    defaults = EngineConfig()
    cal.add_argument("--text", action="append", required=True, help="calibration text file")
    cal.add_argument("--model", default=defaults.model)
    cal.add_argument("--gguf-file", default=defaults.gguf_file)
    cal.add_argument("--device", default=defaults.device)
    cal.add_argument("--dtype", default=defaults.dtype)
    cal.add_argument("--data-dir", default="data", help="the service's KVZIP_DATA_DIR")
    cal.add_argument("--chunk-size", type=int, default=2000)
    cal.set_defaults(run=_calibrate)

    from service.compression.learned.calibration import DEFAULT_JSONL
    from service.compression.learned.targets import TRANSFORMS
    from service.compression.selection import WINDOW

    fit = sub.add_parser(
        "calibrate-scorer",
        help="fit the KVzap predictors of method kvzap",
        description=CALIBRATE_SCORER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("--text", action="append", help="calibration text file (repeatable)")
    fit.add_argument("--jsonl", default=str(DEFAULT_JSONL), help="SQuAD-style articles")
    fit.add_argument("--texts", type=int, default=CORPUS_TEXTS, help="texts taken from --jsonl")
    fit.add_argument("--tokens", type=int, default=1000, help="tokens per --jsonl text")
    fit.add_argument("--tokens-per-text", type=int, default=400, help="positions sampled")
    fit.add_argument("--kind", choices=("linear", "mlp", "both"), default="both")
    fit.add_argument(
        "--target", choices=("kvzip", "kvzip_plus"), default="kvzip", help="scores to imitate"
    )
    fit.add_argument(
        "--transform", choices=TRANSFORMS, default="rank", help="of each text's log-scores"
    )
    fit.add_argument(
        "--window", type=int, default=WINDOW, help="last tokens of a text left out of the fit"
    )
    fit.add_argument(
        "--chunk-size", type=int, default=2000, help="scoring chunk (0: one softmax per text)"
    )
    fit.add_argument("--heldout", type=float, default=0.1, help="fraction of texts held out")
    fit.add_argument("--hidden", type=int, default=512, help="MLP hidden width")
    fit.add_argument("--epochs", type=int, default=15, help="MLP epochs")
    fit.add_argument("--released", help="store a released nvidia/KVzap-* folder instead")
    for flag in ("--model", "--gguf-file", "--device", "--dtype"):
        fit.add_argument(flag, default=getattr(defaults, flag[2:].replace("-", "_")))
    fit.add_argument("--data-dir", default="data", help="the service's KVZIP_DATA_DIR")
    fit.set_defaults(run=_calibrate_scorer)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ServiceError as exc:  # a bad file, a checkpoint for another model...
        sys.stderr.write(f"kvzip {args.command}: {exc}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
