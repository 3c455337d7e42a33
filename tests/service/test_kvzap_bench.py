"""The quality bench's kvzap labels on the tiny model: each document is ingested with method
kvzap (predictor kind per label), re-selected per ratio, and timed as a real ingest."""

from __future__ import annotations

from bench.quality.data import Question, Task
from bench.quality.kvzap import free_articles, ingest_scored
from bench.quality.runner import Grid
from service.config import CompressionConfig
from tests.service.kvzap_testing import store_test_predictor

TEXT = "The orchard keeps apples and pears in long rows. " * 12 + "The pass key is 48213. "


def test_grid_runs_kvzap_labels(tiny_engine, tmp_path):
    engine = tiny_engine.with_config(kvzap_dir=tmp_path)
    linear = store_test_predictor(engine, "linear", seed=1)
    store_test_predictor(engine, "mlp", seed=2)
    task = Task("needle", "n", TEXT, (Question("q", "What is the pass key?", ("48213",)),))
    grid = Grid(engine, ["kvzap-linear", "kvzap-mlp"], [1.0, 0.3], {"needle": 3})
    grid.run([task])
    assert {(r.method, r.ratio) for r in grid.rows} == {
        ("full", 1.0),
        ("kvzap-linear", 0.3),
        ("kvzap-mlp", 0.3),
    }
    timed = {t.method: t for t in grid.timings}
    assert timed["kvzap-mlp"].prefill_s == timed["full"].prefill_s
    doc = engine.encode_document(TEXT)
    passes = engine.reconstruction_passes
    scored = ingest_scored(engine, doc, "kvzap-linear", 2000)
    assert engine.reconstruction_passes == passes and engine.config.kvzap_kind is None
    direct = engine.score(
        engine.prefill_context(doc, CompressionConfig("kvzap", 1.0)), method="kvzap"
    )  # the MLP (preferred when stored) differs from the linear label's scores
    assert not all(
        a.scores.equal(b.scores) for a, b in zip(scored.layers, direct.layers, strict=True)
    )
    assert linear.kind == "linear"


def test_calibration_articles_share_no_sentence_with_the_tasks():
    a = {"paragraphs": [{"context": "Alpha one. Beta two."}]}
    b = {"paragraphs": [{"context": "Gamma three. Delta four."}]}
    c = {"paragraphs": [{"context": "Epsilon five."}]}
    task = Task("needle", "n", "Beta two. The pass key is 1. Gamma three.", ())
    assert free_articles([a, b, c], [task], skip=0) == [c]
