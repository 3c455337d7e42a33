"""The kvpress peer's own environment and the call into it.

kvpress pins transformers < 5.3 (and tokenizers <= 0.23.0), the service needs >= 5.17, so
kvpress lives in bench/.venv-kvpress: a `pip install --target` folder with kvpress and
its pinned transformers stack, put first on sys.path of a child process that otherwise
uses this environment's torch (no second torch download). kvpress imports `datasets` and
`fire` at import time although KVzipPress uses neither; bench/quality/kvpress_stubs
stands in for them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("KVPRESS_TARGET") or ROOT / "bench" / ".venv-kvpress")
STUBS = Path(__file__).resolve().parent / "kvpress_stubs"
PEER = Path(__file__).resolve().parent / "kvpress_peer.py"
PINS = [
    "kvpress==0.5.5",
    "transformers==5.2.0",
    "tokenizers>=0.22,<=0.23.0",
    "huggingface_hub>=1.3,<2",
    "cachetools>=5.5,<6",
    "typer-slim",
]


def ensure() -> Path:
    """Install the pinned kvpress stack into TARGET once (PyPI, no dependencies resolved
    beyond PINS: everything else comes from this environment)."""
    stamp = TARGET / ".installed-kvpress-0.5.5-transformers-5.2.0"
    if not stamp.exists():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade"]
        subprocess.run([*cmd, "--target", str(TARGET), *PINS], check=True)
        stamp.touch()
    return TARGET


class Peer:
    """kvpress_peer.py running on a job in the kvpress environment, in a child process
    (so it can run next to our grid: one core each on a 2-core machine)."""

    def __init__(self, job: dict) -> None:
        ensure()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TARGET), str(STUBS)])
        env.setdefault("HF_HUB_OFFLINE", "1")
        self._tmp = tempfile.TemporaryDirectory()
        self.job_path = Path(self._tmp.name) / "job.json"
        self.out_path = Path(self._tmp.name) / "out.json"
        self.job_path.write_text(json.dumps(job), encoding="utf-8")
        cmd = [sys.executable, str(PEER), str(self.job_path), str(self.out_path)]
        self.process = subprocess.Popen(cmd, env=env)

    def finish(self, deadline: float | None) -> tuple[dict, bool]:
        """Wait until `deadline` (time.time()), then stop the child: (its output so far,
        whether it finished on its own). The peer rewrites its output after every task."""
        import time

        left = None if deadline is None else max(0.0, deadline - time.time())
        try:
            self.process.wait(left)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            self.process.wait(10)
        finished = self.process.returncode == 0
        try:
            if self.out_path.exists():
                return dict(json.loads(self.out_path.read_text(encoding="utf-8"))), finished
            return {"meta": {}, "results": []}, finished
        finally:
            self._tmp.cleanup()

    def join(self, timeout_s: float | None = None) -> dict:
        """Wait for the child; its parsed output (CalledProcessError when it failed)."""
        try:
            code = self.process.wait(timeout_s)
            if code != 0:
                raise subprocess.CalledProcessError(code, self.process.args)
            return dict(json.loads(self.out_path.read_text(encoding="utf-8")))
        finally:
            self._tmp.cleanup()


def save_tokenizer(tokenizer, folder: Path) -> Path:  # type: ignore[no-untyped-def]
    """Save our tokenizer so that transformers 5.2 reloads it identically: it would record a
    GGUF-loaded tokenizer as CodeLlamaTokenizer, which then tokenizes differently
    (newlines become unknown tokens), so the class is set to PreTrainedTokenizerFast."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
