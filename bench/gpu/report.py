"""Render bench/results/gpu.json into docs/benchmarks.md (GPU section) and a figure.

python -m bench.gpu.report [--json bench/results/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOC = Path("docs/benchmarks.md")
FIGURE = Path("docs/figures/gpu_decode.png")
BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"


def figure(rows: list[dict], path: Path) -> None:
    """Per-token decode latency vs context length, with the bandwidth floor."""
    xs = [r["tokens"] // 1024 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [r["hf_decode_ms"] for r in rows], "o-", label="transformers (DynamicCache + sdpa)")
    for ratio, style in (("1.0", "s-"), ("0.3", "^-"), ("0.1", "v-")):
        ax.plot(xs, [r[f"decode_ms_r{ratio}"] for r in rows], style, label=f"ours, ratio {ratio}")
    ax.plot(xs, [r["floor_ms_r1.0"] for r in rows], "k--", label="floor, ratio 1.0")
    ax.plot(xs, [r["floor_ms_r0.3"] for r in rows], "k:", label="floor, ratio 0.3")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x}K" for x in xs])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("ms / token (batch 1)")
    ax.set_title("Decode latency, Llama-3.1-8B shape, bf16, H200")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[0] for c in cols) + " |"
    sep = "|" + "---|" * len(cols)
    body = [
        "| "
        + " | ".join(
            format(r[key], fmt) if key != "tokens" else f"{r[key] // 1024}K" for _, key, fmt in cols
        )
        + " |"
        for r in rows
    ]
    return "\n".join([head, sep, *body])


def section(result: dict) -> str:
    rows = result["rows"]
    ingest = table(
        rows,
        [
            ("context", "tokens", ""),
            ("plain prefill s", "plain_prefill_s", ".2f"),
            ("our prefill s", "our_prefill_s", ".2f"),
            ("scoring s", "scoring_s", ".2f"),
            ("selection s", "select_s", ".3f"),
            ("serialise s", "encode_s", ".2f"),
            ("ingest ÷ prefill", "ingest_over_prefill", ".2f"),
            ("peak GPU GiB", "peak_gpu_gib", ".1f"),
        ],
    )
    decode = table(
        rows,
        [
            ("context", "tokens", ""),
            ("transformers ms", "hf_decode_ms", ".1f"),
            ("r1.0 ms", "decode_ms_r1.0", ".1f"),
            ("r1.0 ÷ floor", "decode_over_floor_r1.0", ".2f"),
            ("r0.3 ms", "decode_ms_r0.3", ".1f"),
            ("r0.3 ÷ floor", "decode_over_floor_r0.3", ".2f"),
            ("r0.1 ms", "decode_ms_r0.1", ".1f"),
            ("r0.3 ÷ r1.0", "r0.3_over_full_latency", ".2f"),
        ],
    )
    serve = table(
        rows,
        [
            ("context", "tokens", ""),
            ("TTFT resident s", "ttft_resident_s", ".3f"),
            ("TTFT disk s", "ttft_disk_s", ".2f"),
            ("TTFT re-prefill s", "ttft_reprefill_s", ".2f"),
            ("disk ÷ re-prefill", "ttft_disk_over_reprefill", ".2f"),
            ("tok/s ×1", "tokens_per_s_b1", ".0f"),
            ("tok/s ×4", "tokens_per_s_b4", ".0f"),
            ("tok/s ×16", "tokens_per_s_b16", ".0f"),
            ("×16 ÷ ×1", "throughput_16_over_1", ".1f"),
            ("stored B/token", "stored_bytes_per_token", ".0f"),
            ("stored ÷ full KV", "stored_over_full_kv", ".3f"),
        ],
    )
    return f"""{BEGIN}
## GPU (H200): ingest, decode, time to first token, concurrency

Machine: {result["device"]}, torch {result["torch"]}; measured device-to-device copy
bandwidth {result["copy_bandwidth_tb_s"]:.2f} TB/s (read + write); model: Llama-3.1-8B shape
(32 layers, 32 query / 8 KV heads, head dim 128) with random bf16 weights
({result["weight_gb"]:.2f} GB). Everything below comes from ONE run of

    python -m bench.gpu.run --lengths 8192 32768 131072 --out bench/results/gpu.json
    python -m bench.gpu.report

(raw numbers: `bench/results/gpu.json`, log with a kernel profile of one 32K ingest:
`bench/results/gpu-bench.log`). Ratio = fraction of context KV pairs kept (KVzip, global
non-uniform top-k). Floor = (weight bytes + kept KV bytes) ÷ measured copy bandwidth.

### Ingest (prefill + KVzip scoring + selection + serialisation) vs plain prefill
{ingest}

### Decode latency per token, batch 1 (static tail + CUDA graph, fused Triton decode)
{decode}

![decode latency](figures/gpu_decode.png)

### Time to first token and concurrency (ratio 0.3)
{serve}

TTFT "disk" = read the safetensors object from a file + unpack to the GPU + first token;
"re-prefill" = plain prefill of the context + first token. Concurrency = requests decoded
together in one batched forward over the same resident context (greedy, 40 steps).
Redis was not measured on the H200 (no redis-server there); see docs/deploy.md.

### Reading against the targets (issue 5)
- ingest ≤ 2.0x prefill at 32K: **missed** ({rows[1]["ingest_over_prefill"]:.2f}x). Scoring runs
  one 2K-token reconstruction forward per chunk over the whole context (about 2x the
  prefill's attention FLOPs plus the MLPs of n tokens) and costs {rows[1]["scoring_s"] / rows[1]["plain_prefill_s"]:.1f}x plain prefill;
  serialisation of the 0.3 cache adds {rows[1]["encode_s"]:.2f} s and our own prefill is
  {rows[1]["our_prefill_s"] / rows[1]["plain_prefill_s"]:.2f}x transformers'. For reference, kvpress 0.5.5 KVzipPress measured
  4.8x at 8K and 6.1x at 32K on the same kind of machine (../shared/GPU.md).
- decode within 1.3x of the floor at 128K: **missed** ({rows[-1]["decode_over_floor_r1.0"]:.2f}x full,
  {rows[-1]["decode_over_floor_r0.3"]:.2f}x at 0.3); ratio 0.3 ÷ full at 128K = {rows[-1]["r0.3_over_full_latency"]:.2f} (target ≤ 0.7).
  The remaining gap is per-kernel launch cost inside the graph (transformers' own ~25
  kernels per layer) rather than bytes; transformers' own decode is {rows[-1]["hf_decode_ms"]:.0f} ms.
- TTFT from disk ≤ 0.25x re-prefill at 32K: **missed** ({rows[1]["ttft_disk_over_reprefill"]:.2f}x; {rows[-1]["ttft_disk_over_reprefill"]:.2f}x at
  128K): reading and uploading ~40 KB per context token dominates.
- stored bytes ≤ ratio × full + 1%: **met** (stored ÷ full KV = {rows[1]["stored_over_full_kv"]:.3f} at ratio 0.3; the
  0.006 above 0.3 is the fp32 score and int32 position kept per pair).
- 16 concurrent ≥ 10x single-request throughput: **met** ({rows[1]["throughput_16_over_1"]:.1f}x at 32K).
{END}"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="bench/results/gpu.json")
    args = parser.parse_args()
    result = json.loads(Path(args.json).read_text())
    figure(result["rows"], FIGURE)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    new = section(result)
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
