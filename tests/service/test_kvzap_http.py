"""Method `kvzap` through HTTP on the tiny model: 400 before calibration, ratio and threshold
selection, query-time re-selection, and the validation of `compression.threshold`."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from service.config import EngineConfig, ServiceConfig
from service.serving.embedded import build_embedded_service
from tests.service.kvzap_testing import store_test_predictor

TEXT = (
    "The ferry to the island leaves at seven. Its captain, Ines Moro, has sailed the route "
    "for twenty years; in winter the crossing takes forty minutes, in summer thirty. "
) * 6
QUESTIONS = ["Who is the captain?", "How long is the crossing in winter?"]


@pytest.fixture()
def engine(tiny_engine, tmp_path):
    """The predictors live under the service's data_dir, as app/settings.py puts them."""
    return tiny_engine.with_config(
        head_scores_dir=tmp_path / "head_scores", kvzap_dir=tmp_path / "kvzap"
    )


@pytest.fixture()
def client(engine, tmp_path):
    service = build_embedded_service(
        ServiceConfig(engine=EngineConfig(model="tiny"), data_dir=tmp_path), engine=engine
    )
    with TestClient(create_app(Settings(data_dir=tmp_path), service=service)) as c:
        yield c


def _create(client, compression: dict):
    return client.post("/contexts", json={"text": TEXT, "compression": compression})


def _answers(client, cid: str, ratio: float | None = None) -> list[str]:
    out = []
    for question in QUESTIONS:
        body: dict[str, object] = {"question": question, "max_new_tokens": 6}
        if ratio is not None:
            body["ratio"] = ratio
        response = client.post(f"/contexts/{cid}/query", json=body)
        assert response.status_code == 200, response.text
        out.append(response.json()["answer"])
    return out


def test_kvzap_without_a_predictor_is_400(client):
    response = _create(client, {"method": "kvzap", "ratio": 0.3})
    assert response.status_code == 400, response.text
    assert "kvzip calibrate-scorer" in response.json()["error"]["message"]


def test_kvzap_ratio_and_query_time_reselection(client, engine):
    store_test_predictor(engine, "mlp")  # under data_dir/kvzap
    stored = _create(client, {"method": "kvzap", "ratio": 0.3})
    assert stored.status_code == 201, stored.text
    info = stored.json()["compression"]
    assert info["method"] == "kvzap" and info["ratio"] == 0.3
    assert abs(info["kept_fraction"] - 0.3) < 1e-3
    direct = _create(client, {"method": "kvzap", "ratio": 0.2}).json()["id"]
    assert _answers(client, stored.json()["id"], 0.2) == _answers(client, direct)


def test_kvzap_threshold_reports_the_achieved_ratio(client, engine):
    store_test_predictor(engine, "linear")
    response = _create(client, {"method": "kvzap", "threshold": -3.0})
    assert response.status_code == 201, response.text
    info = response.json()["compression"]
    assert 0 < info["kept_fraction"] < 1
    assert info["ratio"] == pytest.approx(info["kept_fraction"])
    cid = response.json()["id"]
    assert _create(client, {"method": "kvzap", "threshold": -3.0}).json()["id"] == cid
    assert _create(client, {"method": "kvzap", "threshold": -2.0}).json()["id"] != cid
    assert len(_answers(client, cid, info["ratio"] / 2)) == 2
    too_high = client.post(f"/contexts/{cid}/query", json={"question": "?", "ratio": 0.99})
    assert too_high.status_code == 400


@pytest.mark.parametrize(
    ("compression", "status", "text"),
    [
        ({"method": "kvzip", "threshold": -4.0}, 400, "threshold applies to method kvzap only"),
        ({"method": "kvzap", "threshold": 1000.0}, 422, "compression.threshold: "),
        ({"method": "kvzap", "threshold": "low"}, 422, "compression.threshold: "),
    ],
)
def test_threshold_validation(client, compression, status, text):
    response = _create(client, compression)
    assert response.status_code == status, response.text
    assert text in response.json()["error"]["message"]
