"""Importing and building the HTTP app loads no tensor library (the `api` image has none)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "safetensors", "numpy")

PROGRAM = f"""
import sys
import app, app.__main__, app.main, app.settings, app.routes.contexts, app.routes.health
app.main.create_app(app.settings.Settings())
heavy = [name for name in {HEAVY!r} if name in sys.modules]
assert not heavy, heavy
"""


def test_importing_the_app_does_not_import_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
