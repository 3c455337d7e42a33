"""Method kvzap's ingest against a plain prefill on the GPU, phase by phase:

    python -m bench.gpu.kvzap_ingest --lengths 32768 --out $OUT/kvzap-ingest-cuda.json

8B-shaped random model (bench.gpu.run.build_engine, the service's `auto` attention backend
unless `--backend`), random linear and MLP predictors of the
model's shapes (timing only). Per length, warm, median of `--repeats`:
- plain prefill: transformers' own (sdpa, one forward, DynamicCache);
- kvzap ingest = prefill with the predictor hooks + global top-k selection at 0.3 +
  serialisation to safetensors bytes on the CPU (what the service stores), for each
  `--chunk` (the engine's prefill_chunk_tokens) and stored `--quantization`;
- the same prefill without hooks (method `kvzip` at ratio 1.0 stops after it only in
  `prefill_context`), so the hooks' own cost shows apart from the chunking's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.gpu.run import build_engine, plain_prefill, random_predictor, sync_time
from service import codec
from service.compression.learned.predictor import predictor_path, save_predictor
from service.config import CompressionConfig
from service.engine.kvcache import Document


def _median_s(fn: Any, repeats: int) -> float:
    fn()  # warm: kernels, allocator, cuDNN plans at this length
    times = []
    for _ in range(repeats):
        t0 = sync_time()
        fn()
        times.append(sync_time() - t0)
    return statistics.median(times)


def _phases(engine: Any, doc: Document, quantization: str, repeats: int) -> dict[str, float]:
    """Median seconds of each kvzap ingest phase and of the whole (to CPU bytes)."""
    rows: list[dict[str, float]] = []
    compression = CompressionConfig("kvzap", 0.3)
    for i in range(repeats + 1):
        t0 = sync_time()
        ctx, timings = engine.ingest(doc, compression)
        t1 = sync_time()
        blob = codec.encode(ctx, engine.identity, quantization)
        t2 = sync_time()
        if i:  # the first is the warm-up
            rows.append({
                "prefill_s": timings.prefill_s, "score_s": timings.scoring_s,
                "select_s": timings.selection_s, "encode_s": t2 - t1, "ingest_s": t2 - t0,
                "stored_bytes": len(blob),
            })  # fmt: skip
        del ctx, blob
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def measure_length(engine: Any, n: int, args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(n)
    prefix = list(engine.encode_document("x").prefix_ids)
    ids = torch.randint(100, 49000, (n - len(prefix),), generator=gen).tolist()
    doc = Document(prefix, ids)
    row: dict[str, Any] = {"tokens": n}
    row["plain_prefill_s"] = min(plain_prefill(engine.model, doc.all_ids)[0] for _ in range(2))
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            path = predictor_path(Path(tmp), engine.identity, kind)
            save_predictor(path, random_predictor(engine, kind))
        for chunk in args.chunk:
            bare = engine.with_config(prefill_chunk_tokens=chunk)
            row[f"prefill_no_hooks_chunk{chunk}_s"] = _median_s(
                lambda b=bare: b.prefill_context(doc, CompressionConfig()), args.repeats
            )
            torch.cuda.empty_cache()
            for kind in args.kinds:
                labelled = engine.with_config(
                    kvzap_dir=Path(tmp), kvzap_kind=kind, prefill_chunk_tokens=chunk
                )
                for q in args.quantization:
                    phases = _phases(labelled, doc, q, args.repeats)
                    phases["ingest_over_prefill"] = phases["ingest_s"] / row["plain_prefill_s"]
                    row[f"{kind}_chunk{chunk}_{q}"] = phases
                    print(n, kind, chunk, q, json.dumps(phases), flush=True)
                    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768])
    p.add_argument("--chunk", type=int, nargs="+", default=[16000, 32768])
    p.add_argument("--kinds", nargs="+", default=["linear", "mlp"])
    p.add_argument("--quantization", nargs="+", default=["none", "fp8"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokenizer", default="bench/.cache/tokenizer")
    p.add_argument("--backend", default="auto", help="attention backend (auto: the service's)")
    p.add_argument("--out", type=Path, default=Path("bench/results/kvzap-ingest-cuda.json"))
    args = p.parse_args(argv)
    engine = build_engine(args.tokenizer, args.backend)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": [measure_length(engine, n, args) for n in args.lengths],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
