"""A client that goes away before a non-streamed answer is ready stops its generation, on
both answer routes (a real uvicorn server over the tiny model, a real closed socket)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.settings import ENV_PREFIX, Settings
from tests.app.conftest import serving

TEXT = "The museum opens at nine. Tickets cost twelve euros. The cafe closes at five. " * 8


@pytest.fixture(scope="module")
def live(tiny_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from service.serving.embedded import build_embedded_service

    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(ENV_PREFIX):
                patch.delenv(name)
        settings = Settings(chunk_size=64, data_dir=tmp_path_factory.mktemp("disconnect"))
    service = build_embedded_service(settings.to_service_config(), engine=tiny_engine)
    with serving(create_app(settings, service)) as url:
        with httpx.Client(base_url=url) as http:
            response = http.post("/contexts", json={"text": TEXT})
        assert response.status_code == 201, response.text
        yield {"url": url, "service": service, "id": response.json()["id"]}


@pytest.fixture
def slow_steps(live: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decode step of the live service takes at least 10 ms (so that a 1,000-token
    answer takes far longer than the client waits)."""
    rows = live["service"].pipeline.scheduler.rows
    step = rows.step

    def slow(tokens: Any) -> Any:
        time.sleep(0.01)
        return step(tokens)

    monkeypatch.setattr(rows, "step", slow)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/contexts/{id}/query", {"question": "Tell me everything.", "max_new_tokens": 1000}),
        (
            "/v1/chat/completions",
            {
                "context_id": "{id}",
                "model": "{model}",
                "messages": [{"role": "user", "content": "Tell me everything."}],
                "max_tokens": 1000,
            },
        ),
    ],
)
def test_a_client_that_goes_away_stops_a_non_streamed_answer(
    live: dict[str, Any], slow_steps: None, path: str, body: dict[str, Any]
) -> None:
    from service import telemetry

    service = live["service"]
    cid = live["id"]
    named = {"{id}": cid, "{model}": service.model_name}
    body = {k: named.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    cancelled = telemetry.QUERIES_CANCELLED._value.get()
    generated = telemetry.GENERATED_TOKENS._value.get()
    with (
        httpx.Client(base_url=live["url"], timeout=httpx.Timeout(10.0, read=0.5)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post(path.format(id=cid), json=body)  # gives up after 0.5 s and hangs up
    deadline = time.monotonic() + 5
    scheduler = service.pipeline.scheduler
    while telemetry.QUERIES_CANCELLED._value.get() == cancelled or scheduler.running:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.02)
    assert telemetry.GENERATED_TOKENS._value.get() - generated < 300
