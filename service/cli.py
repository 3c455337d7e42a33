"""`kvzip` command line: one-off operations on a model that do not need the HTTP service.

    kvzip calibrate --text FILE [--text FILE ...] [--model M] [--data-dir data]

`calibrate` computes the per-head scores that compression method `kvzip_head` uses
(service.scorers.kvzip_head) and stores them under <data-dir>/head_scores/, keyed by the
model's fingerprint, where the service (KVZIP_DATA_DIR) looks for them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from service.config import EngineConfig


def _calibrate(args: argparse.Namespace) -> int:
    from service.engine import KVzipEngine
    from service.scorers.kvzip_head import calibrate, save_head_scores

    config = EngineConfig(
        model=args.model, gguf_file=args.gguf_file, device=args.device, dtype=args.dtype
    )
    engine = KVzipEngine.load(config)
    texts = [Path(p).read_text(encoding="utf-8") for p in args.text]
    heads = calibrate(engine, texts, args.chunk_size)
    path = save_head_scores(Path(args.data_dir) / "head_scores", engine.identity, heads)
    sys.stdout.write(f"head scores {tuple(heads.shape)} of {engine.identity.name} -> {path}\n")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
