"""What tenants read when something fails inside (issue 13 item 13): a clean message that
says what failed and the class of the error; the details only in the server log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from service.config import EngineConfig, ServiceConfig
from service.errors import ContextNotReadyError, InvalidInputError, public_message
from service.serving.embedded import build_embedded_service
from service.types import CreateContextRequest, QueryRequest

SECRET = "CUDA out of memory at /srv/models/llama/weights.bin (device 3, pid 4242)"
TEXT = "The museum opens at nine. Tickets cost twelve euros. " * 8


def test_a_domain_error_keeps_its_message_anything_else_only_its_class():
    assert public_message(InvalidInputError("ratio must be <= 1"), "ingesting") == (
        "ratio must be <= 1"
    )
    message = public_message(RuntimeError(SECRET), "ingesting")
    assert SECRET not in message and "/srv" not in message
    assert message == (
        "internal error while ingesting (RuntimeError); details are in the server log"
    )


async def test_a_failed_ingest_shows_no_internals(tiny_engine, tmp_path: Path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError(SECRET)

    config = ServiceConfig(engine=EngineConfig(model="tiny"), data_dir=tmp_path)
    svc = build_embedded_service(config, engine=tiny_engine)
    await svc.start()
    try:
        monkeypatch.setattr(tiny_engine, "ingest", broken)
        with caplog.at_level(logging.WARNING):
            info, _ = await svc.create_context(CreateContextRequest(TEXT, wait=False))
            while (current := await svc.get_context(info.id)).state == "PROCESSING":
                await asyncio.sleep(0.01)
        assert current.state == "FAILED"
        assert current.error == (
            "internal error while ingesting (RuntimeError); details are in the server log"
        )
        with pytest.raises(ContextNotReadyError) as refused:
            await svc.query(info.id, QueryRequest("When?"))
        assert SECRET not in str(refused.value)
        assert SECRET in caplog.text  # the operator still sees why
    finally:
        await svc.close()
