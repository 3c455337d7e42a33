"""The serving result as a Markdown table and a plot (throughput, TTFT and ITL vs load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "plot"]


def _ms(stats: dict[str, float | None], key: str) -> str:
    value = stats.get(key)
    return (
        "n/a" if value is None else f"{1000 * value:.0f}" if value >= 0.1 else f"{1000 * value:.1f}"
    )


def _load(s: dict[str, Any]) -> str:
    return f"c={s['concurrency']}" if s["mode"] == "concurrency" else f"λ={s['rate']:g}/s"


def markdown_table(result: dict[str, Any]) -> str:
    """One row per scenario; ×1 = output tokens/s over the same scenario kind at c=1."""
    rows = [s["summary"] for s in result["scenarios"]]
    base = {
        r["kind"]: r["output_tokens_per_s"]
        for r in rows
        if r["mode"] == "concurrency" and r["concurrency"] == 1
    }
    reference = result.get("engine_reference") or {}
    lines = [
        "| scenario | contexts | load | requests | errors | out tok/s | ÷ c=1 | engine "
        "generate_batch tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        one = base.get(r["kind"])
        scale = f"{r['output_tokens_per_s'] / one:.2f}" if one else "n/a"
        ref = reference.get(str(r["concurrency"])) if r["mode"] == "concurrency" else None
        ref_s = f"{ref['tokens_per_s']:.1f}" if ref else ""
        lines.append(
            f"| {r['kind']} | {r['contexts']} | {_load(r)} | {r['requests']} | {errors} | "
            f"{r['output_tokens_per_s']:.1f} | {scale} | {ref_s} | "
            f"{_ms(r['ttft_s'], 'p50')} / {_ms(r['ttft_s'], 'p99')} | "
            f"{_ms(r['itl_s'], 'p50')} / {_ms(r['itl_s'], 'p99')} | "
            f"{_ms(r['e2e_s'], 'p50')} / {_ms(r['e2e_s'], 'p99')} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Throughput, TTFT and ITL (p50 solid, p99 dashed) against concurrency by scenario
    kind, the engine's generate_batch next to the throughput; Poisson rates in a last panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s["summary"] for s in result["scenarios"]]
    closed = [r for r in rows if r["mode"] == "concurrency"]
    open_ = [r for r in rows if r["mode"] == "poisson"]
    fig, axes = plt.subplots(1, 4 if open_ else 3, figsize=(19 if open_ else 15, 4.2))
    for kind in sorted({r["kind"] for r in closed}):
        mine = sorted((r for r in closed if r["kind"] == kind), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in mine]
        line = axes[0].plot(xs, [r["output_tokens_per_s"] for r in mine], "o-", label=kind)[0]
        for ax, key in ((axes[1], "ttft_s"), (axes[2], "itl_s")):
            c = line.get_color()
            ax.plot(xs, [_v(r[key], "p50") for r in mine], "o-", color=c, label=f"{kind} p50")
            ax.plot(xs, [_v(r[key], "p99") for r in mine], "s--", color=c, label=f"{kind} p99")
    ref = result.get("engine_reference") or {}
    if ref:
        xs = sorted(int(k) for k in ref if k.isdigit())
        ys = [ref[str(x)]["tokens_per_s"] for x in xs]
        axes[0].plot(xs, ys, "k^:", label="engine generate_batch")
    titles = ("output tokens/s", "TTFT (ms)", "inter-token latency (ms)")
    for ax, title in zip(axes[:3], titles, strict=True):
        ax.set(xscale="log", xlabel="concurrent requests", title=title)
        ax.set_xticks(sorted({r["concurrency"] for r in closed}) or [1])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if open_:
        ax = axes[3]
        mine = sorted(open_, key=lambda r: r["rate"])
        xs = [r["rate"] for r in mine]
        ax.plot(xs, [_v(r["ttft_s"], "p50") for r in mine], "o-", label="TTFT p50")
        ax.plot(xs, [_v(r["ttft_s"], "p99") for r in mine], "s--", label="TTFT p99")
        ax.plot(xs, [_v(r["itl_s"], "p99") for r in mine], "^:", label="ITL p99")
        ax.set(xlabel="Poisson arrivals / s", ylabel="ms", title="open loop latency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(result.get("title", "serving"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _v(stats: dict[str, float | None], key: str) -> float:
    value = stats.get(key)
    return float("nan") if value is None else 1000 * value
