"""The GPU report: verdicts computed from the numbers, the kvpress peer merged by length,
the backend-variant table, and the section rendered from the committed run of record."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from bench.gpu import report

ROOT = Path(__file__).resolve().parents[2]


def _run() -> dict:
    return json.loads((ROOT / "bench/results/gpu.json").read_text())


def test_peer_rows_are_merged_by_length_only():
    rows = [{"tokens": 8192}, {"tokens": 32768}]
    peer = {
        "rows": [
            {"tokens": 32768, "kvzippress_over_prefill": 6.0},
            {"tokens": 131072, "error": "OOM"},
        ]
    }
    report.merge_kvpress(rows, peer)
    assert rows == [{"tokens": 8192}, {"tokens": 32768, "kvpress_over_prefill": 6.0}]


def test_variants_table_sorted_fastest_first_with_ratio_to_prefill():
    rows = [
        {
            "tokens": 32768,
            "plain_prefill_s": 2.0,
            "ingest_variants_s": {"cuda_torch_scores": 8.0, "cudnn_triton_scores": 5.0},
        }
    ]
    lines = report.variants_table(rows).splitlines()
    assert lines[2] == "| 32K | `cudnn` | triton | 5.00 | 2.50 |"
    assert lines[3] == "| 32K | `cuda` | torch | 8.00 | 4.00 |"


def test_verdicts_follow_the_numbers():
    rows = copy.deepcopy(_run()["rows"])
    text = report.readings(rows)
    assert "ingest ≤ 2.0x prefill at 32K: **missed**" in text
    r32 = next(r for r in rows if r["tokens"] == 32768)
    r32["ingest_over_prefill"] = 1.9
    assert "ingest ≤ 2.0x prefill at 32K: **met** (1.90x" in report.readings(rows)
    r32["ttft_disk_over_reprefill"] = 0.5  # Redis is worse still: the TTFT target flips
    assert "re-prefill at 32K: **missed**" in report.readings(rows)


def test_section_of_the_committed_run_has_every_table_and_the_commands():
    result = _run()
    peer = json.loads((ROOT / "bench/results/gpu-kvpress.json").read_text())
    text = report.section(copy.deepcopy(result), peer)
    assert text.startswith(report.BEGIN) and text.endswith(report.END)
    assert result["command"] in text and peer["command"] in text
    for heading in (
        "### Ingest",
        "### Decode latency",
        "### Time to first token",
        "### Concurrency",
    ):
        assert heading in text
    assert "n/a |" not in text.split("### Decode latency")[0]  # every ingest cell measured
    doc = (ROOT / "docs/benchmarks.md").read_text()
    assert text in doc  # the committed page is the rendering of the committed numbers
