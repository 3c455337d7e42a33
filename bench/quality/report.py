"""Tables, target checks and the plot, from the rows of a run (ours and kvpress's)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

BEGIN, END = "<!-- bench:quality:begin -->", "<!-- bench:quality:end -->"
BASELINES = ("streaming", "snapkv", "h2o")
PEER = "kvpress KVzipPress"
ORDER = (
    "kvzip", "kvzip_plus", "kvzip_head", "kvzap", "kvzap-linear", "kvzap-mlp",
    "streaming", "snapkv", "h2o", PEER,
)  # fmt: skip


def _by(rows: list[dict], kind: str) -> dict[tuple[str, float], list[dict]]:
    out: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        if r["kind"] == kind:
            out[(r["method"], r["ratio"])].append(r)
    return out


def _methods(rows: list[dict]) -> list[str]:
    present = {r["method"] for r in rows} - {"full"}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def _ratios(rows: list[dict]) -> list[float]:
    return sorted({r["ratio"] for r in rows if r["method"] != "full"} | {1.0}, reverse=True)


def cell(groups, method: str, ratio: float, key: str, scale: float = 100.0) -> float | None:  # type: ignore[no-untyped-def]
    """Mean of `key` for (method, ratio); ratio 1.0 of our methods is the full cache."""
    rows = groups.get((method, ratio))
    if rows is None and ratio == 1.0 and method != PEER:
        rows = groups.get(("full", 1.0))
    if not rows or rows[0].get(key) is None:
        return None
    return scale * mean(r[key] for r in rows)


def _table(rows, kind: str, key: str, title: str, fmt: str = "{:.1f}", scale=100.0) -> str:  # type: ignore[no-untyped-def]
    groups = _by(rows, kind)
    methods, ratios = _methods([r for r in rows if r["kind"] == kind]), _ratios(rows)
    head = f"| {title} | " + " | ".join(f"{r:g}" for r in ratios) + " |"
    lines = [head, "|---" * (len(ratios) + 1) + "|"]
    for m in methods:
        vals = [cell(groups, m, r, key, scale) for r in ratios]
        lines.append(
            f"| {m} | " + " | ".join("–" if v is None else fmt.format(v) for v in vals) + " |"
        )
    return "\n".join(lines)


def _fidelity(rows: list[dict]) -> str:
    """Mean KL per teacher-forced position and argmax flip rate, QA and needles pooled."""
    sums: dict[tuple[str, float], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in rows:
        if r["method"] in ("full", PEER) or r.get("kl") is None:
            continue
        acc = sums[(r["method"], r["ratio"])]
        acc[0] += r["kl"]
        acc[1] += r["flips"]
        acc[2] += r["positions"]
    ratios = [x for x in _ratios(rows) if x < 1.0]
    methods = [m for m in _methods(rows) if m != PEER]
    lines = [
        "| KL nats/token · flips % | " + " | ".join(f"{x:g}" for x in ratios) + " |",
        "|---" * (len(ratios) + 1) + "|",
    ]
    for m in methods:
        vals = []
        for x in ratios:
            kl, flips, n = sums.get((m, x), [0.0, 0.0, 0.0])
            vals.append("–" if not n else f"{kl / n:.3f} · {100 * flips / n:.1f}")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _timings(timings: list[dict], peer: list[dict]) -> str:
    full = [t for t in timings if t["method"] == "full"]
    tokens = sum(t["tokens"] for t in full) or 1
    prefill = sum(t["prefill_s"] for t in full)
    lines = [
        "| method | scoring s / 1K tokens | ingest (prefill + scoring) s / 1K tokens | × prefill |",
        "|---|---|---|---|",
        f"| none (prefill only) | 0 | {1000 * prefill / tokens:.2f} | 1.00 |",
    ]
    methods = _methods([{"method": t["method"]} for t in timings])
    for m in methods:
        ts = [t for t in timings if t["method"] == m]
        n = sum(t["tokens"] for t in ts) or 1
        score = sum(t["score_s"] for t in ts)
        pre = sum(t["prefill_s"] for t in ts)
        lines.append(
            f"| {m} | {1000 * score / n:.2f} | {1000 * (pre + score) / n:.2f} | "
            f"{(pre + score) / max(pre, 1e-9):.2f} |"
        )
    if peer:
        by_ratio: dict[float, list[dict]] = defaultdict(list)
        for p in peer:
            by_ratio[p["ratio"]].append(p)
        base = by_ratio.get(1.0)
        base_s = sum(p["ingest_s"] for p in base) if base else None
        for ratio in sorted(by_ratio, reverse=True):
            ps = by_ratio[ratio]
            n = sum(p["prompt_tokens"] for p in ps) or 1
            s = sum(p["ingest_s"] for p in ps)
            label = (
                f"{PEER} (compression_ratio {1 - ratio:g})" if ratio < 1 else "kvpress, no press"
            )
            factor = f"{s / base_s:.2f}" if base_s else "–"
            lines.append(f"| {label} | – | {1000 * s / n:.2f} | {factor} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) at ratio 0.3 (and kvpress at every ratio)."""
    qa, nd = _by(rows, "qa"), _by(rows, "needle")
    out = []
    f_full, f_kv = cell(qa, "full", 1.0, "score"), cell(qa, "kvzip", 0.3, "score")
    if f_full and f_kv is not None:
        out.append(
            (
                "kvzip keeps ≥ 97% of full-cache SQuAD F1 at 0.3",
                f"{f_kv:.1f} / {f_full:.1f} = {100 * f_kv / f_full:.0f}%",
                f_kv >= 0.97 * f_full,
            )
        )
    n_full, n_kv = cell(nd, "full", 1.0, "score"), cell(nd, "kvzip", 0.3, "score")
    if n_full and n_kv is not None:
        out.append(
            (
                "kvzip keeps ≥ 99% of full-cache needle accuracy at 0.3",
                f"{n_kv:.1f} / {n_full:.1f} = {100 * n_kv / n_full:.0f}%",
                n_kv >= 0.99 * n_full,
            )
        )
        for b in BASELINES:
            v = cell(nd, b, 0.3, "score")
            if v is not None:
                out.append(
                    (
                        f"kvzip beats {b} by ≥ 20 points on needles at 0.3",
                        f"{n_kv:.1f} vs {v:.1f} ({n_kv - v:+.1f})",
                        n_kv - v >= 20,
                    )
                )
    for groups, name in ((qa, "SQuAD F1"), (nd, "needle accuracy")):
        for ratio in _ratios(rows):
            ours, peer = cell(groups, "kvzip", ratio, "score"), cell(groups, PEER, ratio, "score")
            if ours is not None and peer is not None:
                out.append(
                    (
                        f"kvzip ≥ kvpress KVzipPress, {name}, ratio {ratio:g}",
                        f"{ours:.1f} vs {peer:.1f}",
                        ours >= peer,
                    )
                )
    return out


def _paired(rows: list[dict], kind: str, a: str, b: str, ratio: float) -> list[float]:
    """Per-question differences a - b (score, in %) over the questions both answered."""

    def key(r: dict) -> tuple[str, str]:
        return (r["task"], r["qid"])

    def pick(method: str) -> dict[tuple[str, str], float]:
        want = ("full", 1.0) if method == "full" else (method, ratio)
        if method == PEER and ratio == 1.0:
            want = (PEER, 1.0)
        return {
            key(r): r["score"]
            for r in rows
            if r["kind"] == kind and (r["method"], r["ratio"]) == want
        }

    xa, xb = pick(a), pick(b)
    return [100.0 * (xa[k] - xb[k]) for k in xa if k in xb]


def _ci(diffs: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile bootstrap interval of the mean."""
    import random

    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(rounds))
    return mean(diffs), means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def paired_table(rows: list[dict], ratio: float = 0.3) -> str:
    """kvzip against the full cache and every other method at `ratio`: mean per-question
    difference with a 95% bootstrap interval (questions resampled), SQuAD F1 and needles."""
    present = _methods(rows)
    if "kvzip" not in present:
        return ""
    others = ["full"] + [m for m in present if m != "kvzip"]
    lines = [
        f"| kvzip at {ratio:g} minus … | SQuAD F1, points [95% CI] (n) "
        "| needle accuracy, points [95% CI] (n) |",
        "|---|---|---|",
    ]
    for m in others:
        cells = []
        for kind in ("qa", "needle"):
            diffs = _paired(rows, kind, "kvzip", m, ratio)
            if m == "full":
                diffs = _paired(rows, kind, "kvzip", "full", ratio)
            if diffs:
                avg, lo, hi = _ci(diffs)
                cells.append(f"{avg:+.1f} [{lo:+.1f}, {hi:+.1f}] ({len(diffs)})")
            else:
                cells.append("–")
        label = "full cache" if m == "full" else f"{m} at {ratio:g}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict], timings: list[dict], peer: list[dict], header: str) -> str:
    parts = [BEGIN, header]
    if any(r["kind"] == "qa" for r in rows):
        parts += [
            "### Multi-question SQuAD: F1 (%)",
            _table(rows, "qa", "score", "F1 \\ ratio"),
            "### Multi-question SQuAD: exact match (%)",
            _table(rows, "qa", "em", "EM \\ ratio"),
            "### Multi-question SQuAD: answer identical to the full-cache answer (%)",
            _table(rows, "qa", "agree", "agreement \\ ratio"),
        ]
    if any(r["kind"] == "needle" for r in rows):
        parts += [
            "### Needle retrieval: accuracy (%)",
            _table(rows, "needle", "score", "needle \\ ratio"),
        ]
    parts += [
        "### Fidelity: full-cache answers teacher-forced under the compressed cache",
        _fidelity(rows),
        "### Ingest time",
        _timings(timings, peer),
        "### Paired differences at ratio 0.3",
        "Per question (or haystack), kvzip's score minus the other's on the same question; "
        "mean and 95% bootstrap interval (2,000 resamples of the questions). An interval "
        "that contains 0 is no evidence of a difference.",
        paired_table(rows, 0.3),
        "### Targets",
        "\n".join(
            ["| target | measured | met |", "|---|---|---|"]
            + [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets(rows)]
        ),
        END,
    ]
    return "\n\n".join(parts) + "\n"


def write_markdown(path: Path, section: str) -> None:
    """Replace the bench section of `path` (between the markers), keeping the rest."""
    old = path.read_text(encoding="utf-8") if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in old:
        old = old.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, _, rest = old.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + section.rstrip("\n") + tail, encoding="utf-8")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy vs ratio per method: SQuAD F1 and needle accuracy side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("qa", "needle") if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(
        1, len(kinds) + 1, figsize=(5.5 * (len(kinds) + 1), 4.2), squeeze=False
    )
    for ax, kind in zip(axes[0], kinds, strict=False):
        groups = _by(rows, kind)
        ratios = _ratios(rows)
        for m in _methods([r for r in rows if r["kind"] == kind]):
            pts = [(x, cell(groups, m, x, "score")) for x in ratios]
            xs = [x for x, v in pts if v is not None]
            ys = [v for _, v in pts if v is not None]
            style = "--" if m == PEER else ("-" if m.startswith("kvzip") else ":")
            ax.plot(xs, ys, style, marker="o", label=m)
        ax.set_xlabel("ratio (fraction of context KV pairs kept)")
        ax.set_ylabel("SQuAD F1 (%)" if kind == "qa" else "needle accuracy (%)")
        ax.set_title("multi-question SQuAD" if kind == "qa" else "needle retrieval")
        ax.set_xscale("log")
        ax.set_xticks(ratios, [f"{x:g}" for x in ratios])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    _plot_fidelity(axes[0][-1], rows)
    axes[0][-2].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_fidelity(ax, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    """Mean KL(full || compressed) per teacher-forced position vs ratio (log scale)."""
    sums: dict[tuple[str, float], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        if r["method"] not in ("full", PEER) and r.get("kl") is not None and r["positions"]:
            sums[(r["method"], r["ratio"])][0] += r["kl"]
            sums[(r["method"], r["ratio"])][1] += r["positions"]
    ratios = [x for x in _ratios(rows) if x < 1.0]
    for m in [m for m in _methods(rows) if m != PEER]:
        pts = [(x, sums[(m, x)][0] / sums[(m, x)][1]) for x in ratios if sums[(m, x)][1]]
        style = "-" if m.startswith("kvzip") else ":"
        ax.plot([x for x, _ in pts], [v for _, v in pts], style, marker="o", label=m)
    ax.set_xlabel("ratio (fraction of context KV pairs kept)")
    ax.set_ylabel("KL(full || compressed), nats per token")
    ax.set_title("fidelity (lower is better)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if ratios:
        ax.set_xticks(ratios, [f"{x:g}" for x in ratios])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
