"""Method `kvzip_head` below its measured floor (KVZIP_HEAD_MIN_RATIO, docs/quality.md):
refused with a 422 that names the field, at registration and at query time."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from service.compression.scorers.kvzip_head import save_head_scores
from service.config import KVZIP_HEAD_MIN_RATIO, EngineConfig, ServiceConfig
from service.serving.embedded import build_embedded_service

TEXT = "The mill by the river ground wheat for three towns until the flood of 1911. " * 6


@pytest.fixture()
def client(tiny_engine, tmp_path):
    engine = tiny_engine.with_config(head_scores_dir=tmp_path / "head_scores")
    save_head_scores(engine.config.head_scores_dir, engine.identity, torch.rand(engine.n_layers, 2))
    config = ServiceConfig(engine=EngineConfig(model="tiny"), data_dir=tmp_path)
    service = build_embedded_service(config, engine=engine)
    with TestClient(create_app(Settings(data_dir=tmp_path), service=service)) as c:
        yield c


def _create(client, ratio: float):
    compression = {"method": "kvzip_head", "ratio": ratio}
    return client.post("/contexts", json={"text": TEXT, "compression": compression})


def test_kvzip_head_below_its_floor_is_refused_at_registration(client):
    response = _create(client, KVZIP_HEAD_MIN_RATIO - 0.1)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_ratio"
    assert f"compression.ratio must be >= {KVZIP_HEAD_MIN_RATIO:g}" in error["message"]
    assert client.get("/contexts").json()["contexts"] == []  # nothing was registered


def test_kvzip_head_below_its_floor_is_refused_at_query_time(client):
    created = _create(client, 0.5)
    assert created.status_code in (200, 201), created.text
    cid = created.json()["id"]
    ask = {"question": "When was the flood?", "max_new_tokens": 4}
    low = client.post(f"/contexts/{cid}/query", json={**ask, "ratio": 0.2})
    assert low.status_code == 422 and "ratio must be >= " in low.json()["error"]["message"]
    ok = client.post(f"/contexts/{cid}/query", json={**ask, "ratio": KVZIP_HEAD_MIN_RATIO})
    assert ok.status_code == 200, ok.text
    other = client.post(f"/contexts/{cid}/query", json={**ask, "ratio": 0.6})
    assert other.status_code == 400  # above the stored ratio: as before


def test_other_methods_have_no_floor(client):
    response = client.post(
        "/contexts", json={"text": TEXT, "compression": {"method": "kvzip", "ratio": 0.1}}
    )
    assert response.status_code in (200, 201), response.text
