"""Importing every app module, building the HTTP app and the `kvzip` CLI parser loads no
tensor library (the `api` image has none)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "safetensors", "numpy")

PROGRAM = f"""
import sys
import pkgutil, importlib
import app, app.routes
for module in pkgutil.walk_packages(app.__path__, "app."):
    importlib.import_module(module.name)
app.main.create_app(app.settings.Settings())
app.cli.build_parser().parse_args(["ls"])
heavy = [name for name in {HEAVY!r} if name in sys.modules]
assert not heavy, heavy
"""


def test_importing_the_app_does_not_import_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
