"""`make schemathesis`: Schemathesis (its `st` CLI) against a live server over a tiny model.

Builds a tiny random Llama with the real SmolLM2 tokenizer (as tests/conftest.py does),
serves the embedded service on a free local port in this process, and runs
`st run <url>/openapi.json` with every check: no 5xx, and every response conforms to the
schema (status, content type, headers, body). Then sends the hand-written hostile inputs of
tests/fuzz/probes.py to the same server, and prints the generated cases per operation and
the responses per input class (tests/fuzz/report.py), the tables of docs/reliability.md.
Extra arguments go to `st run`; the exit status is st's, or 1 when a probe got a status
other than its documented one.

    python -m tests.fuzz.run [--keyed] [--summary FILE] [--max-examples 100] [st options...]
    make schemathesis [EXAMPLES=100] [ARGS="--keyed --summary FILE"]

`--keyed` serves with API keys and authenticates as a tenant, so the auth checks run too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from app.main import create_app
from app.ratelimit import LocalRateLimiter
from app.settings import ENV_PREFIX, Settings
from tests.app.conftest import serving
from tests.conftest import build_tiny_model_dir
from tests.fuzz.probes import ProbeResult, register, run_probes
from tests.fuzz.probes import markdown as probes_markdown
from tests.fuzz.report import Counts, markdown, summarise

DEFAULT_ARGS = [
    "--checks",
    "all",
    "--generation-deterministic",
    "--workers",
    "1",
    "--phases",
    "examples,coverage,fuzzing,stateful",
    "--suppress-health-check",
    "all",
    "--request-timeout",
    "120",
]


CONFIG = Path(__file__).with_name("schemathesis.toml")
KEYED_FLAG = "--keyed"
"""Serve with API keys (a tenant key and an admin key) and authenticate as the tenant."""
TENANT_KEY = "sk-fuzz-tenant-0001"
SUMMARY_FLAG = "--summary"
"""Also write the summary (the tables below) to this file."""
EVENTS_FLAG = "--report-ndjson-path"
"""st's own option: where its events go (by default a temporary file)."""


def main(argv: list[str]) -> int:
    keyed = KEYED_FLAG in argv
    argv = [arg for arg in argv if arg != KEYED_FLAG]
    summary_path = _take_option(argv, SUMMARY_FLAG)
    events_path = _take_option(argv, EVENTS_FLAG)
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        del os.environ[name]
    with tempfile.TemporaryDirectory(prefix="kvzip-fuzz-") as tmp:
        root = Path(tmp)
        events = Path(events_path) if events_path else root / "events.ndjson"
        application = _application(root, keyed)
        headers = {"Authorization": f"Bearer {TENANT_KEY}"} if keyed else {}
        with serving(application) as url:
            started = time.monotonic()
            contexts = register(url, headers, count=3)
            code = _schemathesis(url, root, contexts, events, headers, argv)
            elapsed = time.monotonic() - started
            results = run_probes(url, headers)
        documented = {
            f"{method.upper()} {path}"
            for path, ops in application.openapi()["paths"].items()
            for method in ops
        }
        counts = summarise(events, documented)
    unexpected = sum(result.unexpected for result in results)
    text = _summary(keyed, counts, elapsed, code, results, unexpected)
    print(text)
    if summary_path:
        Path(summary_path).write_text(text, encoding="utf-8")
    return code or int(unexpected > 0)


def _take_option(argv: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` from argv; returns VALUE (None when absent)."""
    if flag not in argv:
        return None
    index = argv.index(flag)
    value = argv[index + 1]
    del argv[index : index + 2]
    return value


def _application(root: Path, keyed: bool) -> FastAPI:
    """The real app over the embedded service and a tiny random model saved under `root`."""
    from service.config import EngineConfig
    from service.engine.kvzip_engine import KVzipEngine
    from service.engine.loading import load_tokenizer, resolve_source
    from service.serving.embedded import build_embedded_service

    load_tokenizer(resolve_source(EngineConfig())).save_pretrained(root / "tokenizer")
    model_dir = build_tiny_model_dir(root / "tiny", root / "tokenizer")
    engine = KVzipEngine.load(EngineConfig(model=str(model_dir), device="cpu", dtype="float32"))
    settings = Settings(
        data_dir=root / "data",
        max_new_tokens_limit=8,
        chunk_size=64,
        queue_size=256,
        api_keys={TENANT_KEY: "fuzz"} if keyed else None,
        admin_api_key="sk-fuzz-admin-0002" if keyed else None,
    )
    service = build_embedded_service(settings.to_service_config(), engine=engine)
    application = create_app(settings, service)
    # st sends hundreds of keyless requests from this one address and wants each to be
    # 401, so the per-address throttle of 401s is off here (tests/app/test_hardening.py
    # covers it); the configured rate limit is off too, as it is by default.
    application.state.auth_failures = LocalRateLimiter(per_minute=0, burst=1)
    return application


def _config(root: Path, contexts: list[dict[str, Any]]) -> Path:
    """schemathesis.toml plus the dictionaries only the running server knows: the served
    model's name and the ids of `contexts`."""
    model = json.dumps([contexts[0]["model"]])
    ids = json.dumps([context["id"] for context in contexts])
    extra = f"\n[dictionaries.served_model]\nvalues = {model}\n"
    extra += f"\n[dictionaries.contexts]\nvalues = {ids}\n"
    config = root / "schemathesis.toml"
    config.write_text(CONFIG.read_text(encoding="utf-8") + extra, encoding="utf-8")
    return config


def _schemathesis(
    url: str,
    root: Path,
    contexts: list[dict[str, Any]],
    events: Path,
    headers: dict[str, str],
    argv: list[str],
) -> int:
    """`st run` against the live server (in `root`), `contexts` kept alive for the chat
    route (tests/fuzz/hooks.py); its events go to `events`."""
    config = _config(root, contexts)
    st = Path(sys.executable).with_name("st")
    command = [str(st), "--config-file", str(config), "run", f"{url}/openapi.json"]
    command += [arg for name, value in headers.items() for arg in ("--header", f"{name}: {value}")]
    command += [*DEFAULT_ARGS, "--report", "ndjson", "--report-ndjson-path"]
    command += [str(events), *argv]
    events.unlink(missing_ok=True)
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("hooks.py")),
        "FUZZ_KEEP_CONTEXTS": ",".join(context["id"] for context in contexts),
    }
    # st keeps its state in .schemathesis/ under its working directory: the temp one
    return subprocess.run(command, cwd=root, env=env, check=False).returncode


def _summary(
    keyed: bool, counts: Counts, elapsed: float, code: int, results: list[ProbeResult],
    unexpected: int,
) -> str:  # fmt: skip
    mode = "keyed (API keys, as a tenant)" if keyed else "open (no API keys)"
    verdict = "passed" if code == 0 else f"failed (st exit status {code})"
    lines = [
        f"Schemathesis, {mode}: {counts.total} generated cases in {elapsed:.0f} s, {verdict}; "
        f"5xx or no response: {counts.server_errors()}.",
        "",
        markdown(counts),
        f"Hand-written probes: {sum(r.statuses.total() for r in results)} sent, "
        f"{unexpected} with an unexpected status.",
        "",
        probes_markdown(results),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
