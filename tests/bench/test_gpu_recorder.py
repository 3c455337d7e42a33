"""The GPU bench's phase recorder: every phase lands in the JSON, a failed one is recorded
and the next still runs (so a device run cut short keeps what it measured)."""

from __future__ import annotations

import json

from bench.gpu.run import Recorder


def test_phases_are_saved_one_by_one_and_failures_do_not_stop_the_run(tmp_path):
    out = tmp_path / "gpu.json"
    result = {"rows": []}
    rec = Recorder(result, out, compiled=False, redis=False)
    row = {"tokens": 8192}
    result["rows"].append(row)
    with rec.phase(row, "first"):
        row["a"] = 1.5
    assert json.loads(out.read_text())["rows"][0]["a"] == 1.5  # saved before the next phase
    with rec.phase(row, "broken"):
        raise RuntimeError("no kernel for this shape")
    with rec.phase(row, "after"):
        row["b"] = 2
    saved = json.loads(out.read_text())["rows"][0]
    assert saved["broken_error"] == "RuntimeError: no kernel for this shape"
    assert saved["b"] == 2 and set(saved["phase_s"]) == {"first", "broken", "after"}
    assert rec.variants == (("", False),)
    assert Recorder(result, out, compiled=True, redis=True).variants[1] == ("compiled_", True)
