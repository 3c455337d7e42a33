"""The server's default quantization (KVZIP_DEFAULT_QUANTIZATION) in embedded mode: a
registration that leaves `compression.quantization` out is stored with the default and has
the id of one that names the default explicitly; an explicit choice is kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from service.config import EngineConfig, ServiceConfig
from service.serving.embedded import build_embedded_service

TEXT = "The lighthouse keeper wrote the pass key 48213 on the wall of the lamp room. " * 4


def _register(client: TestClient, compression: dict[str, object] | None) -> dict[str, object]:
    body: dict[str, object] = {"text": TEXT}
    if compression is not None:
        body["compression"] = compression
    response = client.post("/contexts", json=body)
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture()
def serve(tiny_engine, tmp_path: Path):
    def client(**settings: object) -> TestClient:
        config = ServiceConfig(engine=EngineConfig(model="tiny"), data_dir=tmp_path)
        service = build_embedded_service(config, engine=tiny_engine)
        app = create_app(Settings(data_dir=tmp_path, **settings), service=service)  # type: ignore[arg-type]
        return TestClient(app)

    return client


@pytest.mark.timeout(240)
def test_left_out_quantization_is_the_default_and_has_its_id(serve) -> None:
    with serve() as client:
        omitted = _register(client, None)
        partial = _register(client, {"ratio": 0.3})
        null = _register(client, {"quantization": None})
        explicit = _register(client, {"quantization": "fp8"})
        unquantized = _register(client, {"quantization": "none"})

    assert omitted["compression"]["quantization"] == "fp8"  # type: ignore[index]
    assert omitted["id"] == partial["id"] == null["id"] == explicit["id"]
    assert unquantized["compression"]["quantization"] == "none"  # type: ignore[index]
    assert unquantized["id"] != omitted["id"]
    fp8_bytes = omitted["compression"]["bytes"]  # type: ignore[index]
    assert fp8_bytes < unquantized["compression"]["bytes"]  # type: ignore[index]


@pytest.mark.timeout(240)
def test_the_operator_chooses_the_default(serve) -> None:
    with serve(default_quantization="none") as client:
        omitted = _register(client, None)
        explicit = _register(client, {"quantization": "int4"})
    with serve() as client:  # the same data directory, the fp8 default
        named = _register(client, {"quantization": "none"})

    assert omitted["compression"]["quantization"] == "none"  # type: ignore[index]
    assert explicit["compression"]["quantization"] == "int4"  # type: ignore[index]
    assert named["id"] == omitted["id"]  # the id hashes the resolved quantization
