"""`make schemathesis`: Schemathesis (its `st` CLI) against a live server over a tiny model.

Builds a tiny random Llama with the real SmolLM2 tokenizer (as tests/conftest.py does),
serves the embedded service on a free local port in this process, and runs
`st run <url>/openapi.json` with every check: no 5xx, and every response conforms to the
schema (status, content type, headers, body). Extra arguments go to `st run`; the exit
status is st's.

    python -m tests.fuzz.run [--keyed] [--max-examples 40] [st run options...]
    make schemathesis [EXAMPLES=40] [ARGS=--keyed]

`--keyed` serves with API keys and authenticates as a tenant, so the auth checks run too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from app.main import create_app
from app.ratelimit import LocalRateLimiter
from app.settings import ENV_PREFIX, Settings
from tests.app.conftest import serving
from tests.conftest import build_tiny_model_dir

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


KEYED_FLAG = "--keyed"
"""Serve with API keys (a tenant key and an admin key) and authenticate as the tenant."""
TENANT_KEY = "sk-fuzz-tenant-0001"


def main(argv: list[str]) -> int:
    from service.config import EngineConfig
    from service.engine.kvzip_engine import KVzipEngine
    from service.engine.loading import load_tokenizer, resolve_source
    from service.serving.embedded import build_embedded_service

    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        del os.environ[name]
    with tempfile.TemporaryDirectory(prefix="kvzip-fuzz-") as tmp:
        root = Path(tmp)
        load_tokenizer(resolve_source(EngineConfig())).save_pretrained(root / "tokenizer")
        model_dir = build_tiny_model_dir(root / "tiny", root / "tokenizer")
        engine = KVzipEngine.load(EngineConfig(model=str(model_dir), device="cpu", dtype="float32"))
        keyed = KEYED_FLAG in argv
        argv = [arg for arg in argv if arg != KEYED_FLAG]
        settings = Settings(
            data_dir=root / "data",
            max_new_tokens_limit=8,
            chunk_size=64,
            queue_size=256,
            api_keys={TENANT_KEY: "fuzz"} if keyed else None,
            admin_api_key="sk-fuzz-admin-0002" if keyed else None,
        )
        if keyed:
            argv = ["--header", f"Authorization: Bearer {TENANT_KEY}", *argv]
        service = build_embedded_service(settings.to_service_config(), engine=engine)
        st = Path(sys.executable).with_name("st")
        application = create_app(settings, service)
        # st sends hundreds of keyless requests from this one address and wants each to be
        # 401, so the per-address throttle of 401s is off here (tests/app/test_hardening.py
        # covers it); the configured rate limit is off too, as it is by default.
        application.state.auth_failures = LocalRateLimiter(per_minute=0, burst=1)
        with serving(application) as url:
            config = Path(__file__).with_name("schemathesis.toml")
            command = [str(st), "--config-file", str(config), "run", f"{url}/openapi.json"]
            command += [*DEFAULT_ARGS, *argv]
            # st keeps its state in .schemathesis/ under its working directory: the temp one
            return subprocess.run(command, cwd=root, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
