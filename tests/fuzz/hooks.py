"""Schemathesis hooks of `make schemathesis` (tests/fuzz/run.py loads this file through
SCHEMATHESIS_HOOKS).

The contexts run.py registers for the chat route (their ids in FUZZ_KEEP_CONTEXTS, comma
separated) must outlive the fuzzing phase, or the chat route is fuzzed against 404s only:
a DELETE or PATCH that the examples, coverage or fuzzing phase aims at one of them goes to an
id that names no context instead (answered 404, like any other unknown id).
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

KEEP = frozenset(filter(None, os.environ.get("FUZZ_KEEP_CONTEXTS", "").split(",")))
NOWHERE = "ctx_" + "0" * 32


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: Any) -> None:
    """Every phase sends through here (map_case does not see the examples phase). The
    stateful phase, the last one, may delete them: its checks follow what it deletes."""
    parameters = case.path_parameters or {}
    phase = case.meta.phase.name if case.meta is not None else None
    if (
        phase != "stateful"
        and case.method.upper() in ("DELETE", "PATCH")
        and parameters.get("context_id") in KEEP
    ):
        case.path_parameters = {**parameters, "context_id": NOWHERE}
