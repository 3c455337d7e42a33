"""The needle grid's own machinery (bench/quality/needle_grid.py, needles.py, needle_report.py):
the fast greedy answer is the plain greedy answer, haystacks hold their facts, intervals
resample haystacks, and stored quantizations are paired with their unquantized selection."""

from __future__ import annotations

import pytest
import torch

from bench.quality import needle_report
from bench.quality.data import Question, Task, load_articles
from bench.quality.needle_grid import MAX_NEW, full_answer, greedy_answer, run_task, stored
from bench.quality.needles import first_answer, haystacks
from service.compression.selection import select
from service.config import CompressionConfig
from service.types import SamplingParams

TEXT = "The keeper of the north gate wrote 48213 in his log. The tide came in at noon. " * 5


@pytest.mark.parametrize("ratio", [0.6, 0.3, 0.1])
def test_fast_greedy_answer_is_the_greedy_answer(tiny_engine, ratio):
    engine = tiny_engine
    full = engine.prefill_context(engine.encode_document(TEXT), CompressionConfig("kvzip"))
    ctx = select(engine.score(full, method="streaming"), ratio)
    for question in ("What did the keeper write?", "When did the tide come in?"):
        prompt = engine.encode_question(question)
        plain = first_answer(
            engine.generate(ctx, prompt, SamplingParams(max_new_tokens=MAX_NEW)), engine.decode
        )
        for forced in (full_answer(engine, full, prompt), [], [5, 6, 7]):
            assert greedy_answer(engine, ctx, prompt, forced) == plain


def test_haystacks_are_seeded_and_hold_both_facts(tiny_engine):
    def count(text: str) -> int:
        return len(tiny_engine.tokenizer.encode(text, add_special_tokens=False))

    articles = load_articles()[:2]
    tasks = haystacks(articles, count, 3, (300, 500), seed=5)
    assert [t.text for t in tasks] == [t.text for t in haystacks(articles, count, 3, (300, 500), 5)]
    for task in tasks:
        assert len(task.questions) == 2 and 250 <= task.meta["tokens"] <= 520
        for q in task.questions:
            assert task.text.count(q.answers[0]) == 1


def test_intervals_resample_haystacks_not_questions():
    rows = []
    for doc in range(10):  # half the haystacks lose both questions, half keep both
        for q in range(2):
            rows.append({"task": f"d{doc}", "qid": f"q{q}", "method": "full", "ratio": 1.0,
                         "hit": 1.0})  # fmt: skip
            rows.append({"task": f"d{doc}", "qid": f"q{q}", "method": "m", "ratio": 0.3,
                         "hit": float(doc % 2)})  # fmt: skip
    mean, low, high, n = needle_report.paired(rows, ("m", 0.3), ("full", 1.0))
    assert n == 10 and mean == pytest.approx(-50.0)
    assert low < -60 and high > -40  # 10 clusters, not 20 independent questions


def test_a_later_results_part_replaces_rerun_methods():
    def row(method: str, hit: float) -> dict:
        return {"task": "t", "method": method, "ratio": 0.5, "qid": "q", "answer": "", "hit": hit}

    seconds = {"t": {"prefill": 1.0, "kvzip": 2.0, "snapkv": 3.0}}
    old = {"header": {}, "rows": [row("kvzip", 1.0), row("snapkv", 0.0)], "seconds": seconds}
    rerun = {"t": {"prefill": 9.0, "snapkv": 0.5}}
    new = {"header": {}, "rows": [row("snapkv", 1.0)], "seconds": rerun}
    for part in (old, new):
        part["tasks"] = {"t": {}}
    data = needle_report.merged([old, new])
    assert sorted((r["method"], r["hit"]) for r in data["rows"]) == [
        ("kvzip", 1.0),
        ("snapkv", 1.0),
    ]
    assert data["seconds"]["t"] == {"prefill": 1.0, "kvzip": 2.0, "snapkv": 0.5}


def test_quantized_rows_are_paired_with_their_unquantized_selection(tiny_engine):
    """--quantizations: every selection asked again as stored and loaded (`+fp8`, `+int4`),
    and the report's targets compare each with the same method unquantized."""
    engine = tiny_engine
    question = Question("q0", "What did the keeper write?", ("48213",))
    task = Task("needle", "t", TEXT, (question,), {"tokens": 100})
    rows, _ = run_task(engine, task, {"streaming": "streaming"}, [0.3], ["none", "fp8", "int4"])
    assert {(r["method"], r["ratio"]) for r in rows} == {
        ("full", 1.0),
        ("streaming", 0.3),
        ("streaming+fp8", 0.3),
        ("streaming+int4", 0.3),
    }
    full = engine.prefill_context(engine.encode_document(TEXT), CompressionConfig("kvzip"))
    ctx = select(engine.score(full, method="streaming"), 0.3)
    back = stored(engine, ctx, "fp8")
    assert stored(engine, ctx, "none") is ctx
    for a, b in zip(ctx.layers, back.layers, strict=True):
        assert torch.equal(a.positions, b.positions)
        assert (b.keys - a.keys).abs().max() <= a.keys.abs().max() / 8
    report = [
        {"task": f"d{d}", "qid": "q", "method": m, "ratio": 0.3, "hit": hit}
        for d in range(10)
        for m, hit in (("kvzip", 1.0), ("kvzip+fp8", float(d > 0)), ("kvzip+int4", 1.0))
    ]
    got = {t: ok for t, _, ok in needle_report.targets(report)}
    assert got == {"kvzip+fp8 at 0.3 within 1 haystack of kvzip": "yes",
                   "kvzip+int4 at 0.3 within 5 points of kvzip": "yes"}  # fmt: skip
    report[-2]["hit"] = 0.0  # a second haystack lost: 20 points of 10 haystacks
    assert "kvzip+fp8 at 0.3 within 1 haystack of kvzip" in {
        t for t, _, ok in needle_report.targets(report) if ok != "yes"
    }


def test_a_named_section_leaves_the_others_alone(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "a\n<!-- bench:needle-grid:begin -->\nold grid\n<!-- bench:needle-grid:end -->\nb\n"
    )
    part = "<!-- bench:q:begin -->\nnew\n<!-- bench:q:end -->"
    needle_report.write(page, part, "q")
    needle_report.write(page, part.replace("new", "newer"), "q")
    text = page.read_text()
    assert "old grid" in text and "newer" in text and text.count("bench:q:begin") == 1
