"""Bounded local load test: N concurrent SSE streams for a while against the real server.

    python -m bench.serve.soak                       # 64 streams, 60 s (docs/reliability.md)
    python -m bench.serve.soak --streams 64 --duration 10 --json out.json

Serves `python -m app` (the production entry point: embedded service, uvicorn) in a child
process over a tiny random Llama with the real SmolLM2 tokenizer (as `make schemathesis`
does), on a free loopback port, with a small queue (`--queue-size`), a small KV budget
(`--kv-budget-bytes`) and a rate limit (`--rate-limit-per-minute`), so that it must refuse.
Registers `--contexts` documents, warms up, then runs bench/serve/load.py at concurrency
`--streams` for `--duration` s (streamed `POST /contexts/{id}/query`, every request with a
deadline of `--request-timeout` s; a refused client waits the refusal's Retry-After), while
a thread samples the server's RSS (/proc/<pid>/status) every `--sample-s` s.

It holds when: every response is a 200 stream that ends with [DONE], or a 429 / 503
refusal carrying Retry-After; no request reaches its deadline; the server is still ready
afterwards; and the RSS grew by less than `--rss-growth-limit-mib` from the end of the
warm-up to the end of the run (why that bound: docs/reliability.md, "Load held"). Prints
the numbers (and writes them with `--json`); the exit status is 1 when it did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.serve.load import Scenario, percentiles, run_scenario

__all__ = ["SoakResult", "main", "soak"]

REFUSALS = ("429", "503")
MIB = 1024**2


@dataclass
class SoakResult:
    """What a run measured and whether it held (`problems` empty)."""

    settings: dict[str, Any]
    summary: dict[str, Any]
    outcomes: dict[str, int]  # "200", "429", "503", or an error kind
    refusals_without_retry_after: int
    rss_mib: dict[str, float]
    ready_after: bool
    refusal_s: dict[str, float | None] = field(default_factory=dict)  # latency of refusals
    rss_timeline: list[tuple[float, float]] = field(default_factory=list)  # (s, MiB)
    problems: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return not self.problems


class RssSampler:
    """A thread reading VmRSS of `pid` every `period_s` seconds; `mark()` notes a sample."""

    def __init__(self, pid: int, period_s: float) -> None:
        self.pid, self.period_s = pid, period_s
        self.samples: list[tuple[float, float]] = []  # (monotonic s, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def mark(self) -> float:
        value = self.rss_mib()
        self.samples.append((time.monotonic(), value))
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.mark()
            except (OSError, StopIteration):
                return  # the process is gone

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=64, help="concurrent clients")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of load before")
    p.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens per answer")
    p.add_argument("--contexts", type=int, default=4, help="documents registered")
    p.add_argument("--queue-size", type=int, default=8)
    p.add_argument("--max-batch-rows", type=int, default=8)
    p.add_argument("--kv-budget-bytes", type=int, default=MIB)  # contexts + ~4 rows
    p.add_argument("--rate-limit-per-minute", type=int, default=1200)
    p.add_argument("--rate-limit-burst", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=60.0, help="each request's deadline")
    p.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling period")
    p.add_argument("--rss-growth-limit-mib", type=float, default=32.0)
    p.add_argument("--model-dir", type=Path, default=None, help="a saved tiny model (else built)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    return p.parse_args(argv)


def build_model_dir(root: Path) -> Path:
    """The tiny random Llama of the tests, with the default model's tokenizer."""
    from service.config import EngineConfig
    from service.engine.loading import load_tokenizer, resolve_source
    from tests.conftest import build_tiny_model_dir

    load_tokenizer(resolve_source(EngineConfig())).save_pretrained(root / "tokenizer")
    return build_tiny_model_dir(root / "tiny", root / "tokenizer")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(
    args: argparse.Namespace, model_dir: Path, data_dir: Path, port: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    env.update(
        HF_HUB_OFFLINE="1",
        KVZIP_MODEL=str(model_dir),
        KVZIP_DEVICE="cpu",
        KVZIP_DTYPE="float32",
        KVZIP_DATA_DIR=str(data_dir),
        KVZIP_HOST="127.0.0.1",
        KVZIP_PORT=str(port),
        KVZIP_LOG_LEVEL="warning",
        KVZIP_CHUNK_SIZE="64",
        KVZIP_QUEUE_SIZE=str(args.queue_size),
        KVZIP_MAX_BATCH_ROWS=str(args.max_batch_rows),
        KVZIP_KV_BUDGET_BYTES=str(args.kv_budget_bytes),
        KVZIP_MAX_NEW_TOKENS_LIMIT=str(max(args.new_tokens, 1)),
        KVZIP_RATE_LIMIT_PER_MINUTE=str(args.rate_limit_per_minute),
        KVZIP_RATE_LIMIT_BURST=str(args.rate_limit_burst),
    )
    return env


@contextmanager
def serving_process(
    env: dict[str, str], start_timeout_s: float = 180.0
) -> Iterator[tuple[str, int]]:
    """`python -m app` with `env` until the block ends; yields (base URL, pid). Stopped with
    SIGTERM (then SIGKILL after 30 s) whatever happens in the block."""
    url = f"http://127.0.0.1:{env['KVZIP_PORT']}"
    process = subprocess.Popen([sys.executable, "-m", "app"], env=env)
    try:
        _wait_ready(url, process, start_timeout_s)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server was not ready within {timeout_s:.0f} s")


def register(url: str, count: int) -> list[str]:
    """`count` small documents (a few hundred tokens each), ingested before returning."""
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 12
    ids = []
    with httpx.Client(base_url=url, timeout=120.0) as client:
        for i in range(count):
            text = f"Document {i}. {filler}The pass key is {48213 + i}. {filler}"
            response = client.post("/contexts", json={"text": text, "wait": True})
            response.raise_for_status()
            ids.append(response.json()["id"])
    return ids


def _scenario(args: argparse.Namespace, ids: list[str], name: str, seconds: float) -> Scenario:
    return Scenario(
        name,
        tuple(ids),
        concurrency=args.streams,
        duration_s=seconds,
        new_tokens=args.new_tokens,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.request_timeout + 10.0,
        honour_retry_after=True,
    )


def judge(result: SoakResult, records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Fill `result.problems`: anything but 200s and refusals with Retry-After, a request at
    its deadline, the server not ready afterwards, RSS growth over the bound."""
    unexpected = {k: n for k, n in result.outcomes.items() if k not in ("200", *REFUSALS)}
    if unexpected:
        result.problems.append(f"outcomes other than 200/429/503: {unexpected}")
    if result.refusals_without_retry_after:
        result.problems.append(
            f"{result.refusals_without_retry_after} refusals without Retry-After"
        )
    late = [r for r in records if (r["e2e_s"] or 0.0) >= args.request_timeout]
    if late:
        result.problems.append(
            f"{len(late)} requests reached their {args.request_timeout} s deadline"
        )
    if not result.ready_after:
        result.problems.append("the server was not ready after the run")
    if result.rss_mib["growth"] >= args.rss_growth_limit_mib:
        result.problems.append(
            f"RSS grew {result.rss_mib['growth']:.1f} MiB (limit {args.rss_growth_limit_mib})"
        )
    if not result.outcomes.get("200"):
        result.problems.append("no request was answered")


def _outcomes(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter("200" if r["error"] is None else r["error"] for r in records)


def soak(args: argparse.Namespace, model_dir: Path) -> SoakResult:
    """Serve, register, warm up, run the measured window; the numbers and the verdict."""
    with tempfile.TemporaryDirectory(prefix="kvzip-soak-") as tmp:
        env = server_env(args, model_dir, Path(tmp) / "data", _free_port())
        with serving_process(env) as (url, pid), RssSampler(pid, args.sample_s) as rss:
            ids = register(url, args.contexts)
            if args.warmup > 0:
                asyncio.run(run_scenario(url, _scenario(args, ids, "warmup", args.warmup)))
            started, start = time.monotonic(), rss.mark()
            run = asyncio.run(run_scenario(url, _scenario(args, ids, "soak", args.duration)))
            end = rss.mark()
            ready = httpx.get(f"{url}/readyz", timeout=10.0).status_code == 200
            window = [(t, mib) for t, mib in rss.samples if t >= started]
    records = run["records"]
    refused = [r for r in records if r["error"] in REFUSALS]
    result = SoakResult(
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        summary=run["summary"],
        outcomes=dict(_outcomes(records)),
        refusals_without_retry_after=sum(1 for r in refused if not r["retry_after"]),
        rss_mib={"start": start, "end": end, "max": max(mib for _, mib in window)},
        ready_after=ready,
        refusal_s=percentiles([r["e2e_s"] for r in refused]),
        rss_timeline=[(round(t - started, 1), round(mib, 1)) for t, mib in window],
    )
    result.rss_mib["growth"] = end - start
    judge(result, records, args)
    return result


def report(result: SoakResult) -> str:
    s, rss = result.summary, result.rss_mib
    e2e, ttft = s["e2e_s"], s["ttft_s"]
    lines = [
        f"{s['concurrency']} streams for {s['duration_s']:.0f} s: {s['requests']} requests, "
        f"outcomes {dict(sorted(result.outcomes.items()))}, "
        f"refusals without Retry-After {result.refusals_without_retry_after}",
        f"answered: {s['ok']} ({s['requests_per_s']:.1f}/s, {s['output_tokens']} tokens); "
        f"e2e p50 {e2e['p50'] or 0:.3f} s p99 {e2e['p99'] or 0:.3f} s; "
        f"TTFT p99 {ttft['p99'] or 0:.3f} s; refusals p99 {result.refusal_s['p99'] or 0:.3f} s",
        f"server RSS: {rss['start']:.1f} MiB after warm-up, max {rss['max']:.1f}, "
        f"end {rss['end']:.1f}, growth {rss['growth']:+.1f} MiB",
        f"ready afterwards: {result.ready_after}; "
        + ("HELD" if result.held else "FAILED: " + "; ".join(result.problems)),
    ]
    return "\n".join(lines)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvzip-soak-model-") as tmp:
        model_dir = args.model_dir or build_model_dir(Path(tmp))
        result = soak(args, model_dir)
    print(report(result), flush=True)
    if args.json is not None:
        machine = {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "load_average_at_end": os.getloadavg(),
        }
        command = ["python", "-m", "bench.serve.soak", *(sys.argv[1:] if argv is None else argv)]
        payload = {"command": command, "machine": machine, **vars(result)}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0 if result.held else 1


if __name__ == "__main__":
    raise SystemExit(main())
