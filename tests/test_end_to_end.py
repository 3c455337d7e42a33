"""End to end on the real default model (SmolLM2-135M-Instruct GGUF), through HTTP.

A ~1,500-token haystack of SQuAD paragraphs with a pass key, compressed at ratio 0.3,
must still answer the pass key; re-registering is idempotent; a restarted service answers
from the disk tier without re-ingesting.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[1] / "bench" / "data" / "squad_train_sample.jsonl"
QUESTION = "What is the pass key? Answer with the number only."


def _haystack(words: int = 1000) -> str:
    article = json.loads(DATA.open().readline())
    paragraphs, total = [], 0
    for p in article["paragraphs"]:
        paragraphs.append(p["context"])
        total += len(p["context"].split())
        if total >= words:
            break
    paragraphs.insert(len(paragraphs) // 2, "The pass key is 48213. Remember it.")
    return "\n\n".join(paragraphs)


_ENGINE: dict[str, object] = {}


def test_pass_key_survives_compression_and_restart(tmp_path):
    settings = Settings(data_dir=tmp_path)
    body = {"text": _haystack(), "compression": {"method": "kvzip", "ratio": 0.3}}
    with TestClient(create_app(settings)) as client:
        created = client.post("/contexts", json=body)
        assert created.status_code == 201, created.text
        ctx = created.json()
        assert 1300 <= ctx["usage"]["context_tokens"] <= 2200
        assert abs(ctx["compression"]["kept_fraction"] - 0.3) <= 0.01
        answer = client.post(f"/contexts/{ctx['id']}/query", json={"question": QUESTION})
        assert answer.status_code == 200
        assert "48213" in answer.json()["answer"]
        again = client.post("/contexts", json=body)
        assert again.status_code == 200 and again.json()["id"] == ctx["id"]
        engine = client.app.state.service.engine
        _ENGINE["default"] = engine

    from service.serving.embedded import build_embedded_service

    restarted = build_embedded_service(settings.to_service_config(), engine=engine)
    passes = engine.reconstruction_passes
    with TestClient(create_app(settings, service=restarted)) as client:
        answer = client.post(f"/contexts/{ctx['id']}/query", json={"question": QUESTION})
        assert answer.status_code == 200 and "48213" in answer.json()["answer"]
    assert engine.reconstruction_passes == passes  # served from disk, not re-ingested
    assert restarted.resident.misses == 1


def _readme_document() -> str:
    """The document of the README's curl session."""
    lines = [f"Line {i}: the orchard keeps apples, pears and plums in rows." for i in range(90)]
    return (
        "\n".join(lines[:45])
        + "\n\nThe pass key is 48213. Remember it.\n\n"
        + "\n".join(lines[45:])
    )


def test_readme_session_answers_the_short_question(tmp_path):
    from service.engine.kvzip_engine import KVzipEngine
    from service.serving.embedded import build_embedded_service

    settings = Settings(data_dir=tmp_path)
    engine = _ENGINE.get("default") or KVzipEngine.load(settings.to_service_config().engine)
    service = build_embedded_service(settings.to_service_config(), engine=engine)  # type: ignore[arg-type]
    body = {"text": _readme_document(), "compression": {"method": "kvzip", "ratio": 0.3}}
    with TestClient(create_app(settings, service=service)) as client:
        ctx = client.post("/contexts", json=body).json()
        assert ctx["usage"]["context_tokens"] == 1626
        assert ctx["compression"]["kept_kv_pairs"] == 43902  # floor(0.3 * 30 * 3 * 1626)
        answer = client.post(
            f"/contexts/{ctx['id']}/query", json={"question": "What is the pass key?"}
        )
        assert "48213" in answer.json()["answer"]


def test_quantized_and_unquantized_caches_answer_the_pass_key_alike(tmp_path):
    """Issue 18's acceptance: one kvzip selection at 0.3 of the pass-key haystack, stored
    as none / fp8 / int4 and loaded back the way the service does, answers the same greedy
    tokens on the real default model."""
    from service import codec
    from service.config import CompressionConfig
    from service.engine.kvzip_engine import KVzipEngine
    from service.types import SamplingParams

    settings = Settings(data_dir=tmp_path)
    engine = _ENGINE.get("default") or KVzipEngine.load(settings.to_service_config().engine)
    assert isinstance(engine, KVzipEngine)
    ctx, _ = engine.ingest(engine.encode_document(_haystack()), CompressionConfig("kvzip", 0.3))
    prompt = engine.encode_question(QUESTION)
    params = SamplingParams(max_new_tokens=16)
    answers = {}
    for scheme in ("none", "fp8", "int4"):
        blob = codec.encode(ctx, engine.identity, scheme)
        ids = codec.prefix_ids(blob)
        prefix = engine.prefix_context(ids) if ids else None
        loaded = codec.decode(blob, engine.identity, prefix=prefix)
        answers[scheme] = engine.decode(list(engine.generate(loaded, prompt, params)))
    assert "48213" in answers["none"]
    assert answers["fp8"] == answers["none"] and answers["int4"] == answers["none"], answers
