"""A test double of service.facade.ContextService, plugged into the HTTP layer.

It exercises app/ only (status mapping, schemas, validation); the real engine is covered by
the end-to-end tests. Tokens are whitespace-separated words.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import ENV_PREFIX, Settings
from service.errors import ContextNotFoundError, DocumentTooLongError, ServiceError
from service.serving.records import paginate
from service.types import (
    ANY_TENANT,
    CompressionStats,
    ContextInfo,
    ContextPage,
    CreateContextRequest,
    QueryEvent,
    QueryRequest,
    QueryResult,
    QueryTimings,
)

MAX_CONTEXT_TOKENS = 50
MAX_NEW_TOKENS_LIMIT = 256
CREATE_TIME = datetime(2025, 3, 14, 15, 9, 26, tzinfo=UTC)
ANSWER_WORDS = ["The", " pass", " key", " is", " 48213."]


@dataclass
class FakeContextService:
    """In-memory ContextService. `fail_with` is raised by the next use-case call."""

    model_name: str = "fake-model"
    ready: bool = True
    started: bool = False
    closed: bool = False
    fail_with: ServiceError | None = None
    fail_start: ServiceError | None = None
    calls: list[str] = field(default_factory=list)
    contexts: dict[str, ContextInfo] = field(default_factory=dict)
    tenants: dict[str, str] = field(default_factory=dict)  # context id -> owning tenant
    created_requests: list[CreateContextRequest] = field(default_factory=list)
    queries: list[tuple[str, QueryRequest]] = field(default_factory=list)
    updates: list[tuple[str, datetime, str]] = field(default_factory=list)
    listings: list[tuple[str, int, str | None]] = field(default_factory=list)
    streamed_deltas: int = 0  # deltas handed out by stream_query
    stream_closed: bool = False  # a stream_query iterator was closed before its end
    delta_pause_s: float = 0.0

    async def start(self) -> None:
        self.started = True
        if self.fail_start is not None:
            raise self.fail_start

    async def close(self) -> None:
        self.closed = True

    def is_ready(self) -> bool:
        return self.ready

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error

    async def create_context(self, request: CreateContextRequest) -> tuple[ContextInfo, bool]:
        self._enter("create_context")
        self.created_requests.append(request)
        tokens = len(request.text.split())
        if tokens > MAX_CONTEXT_TOKENS:
            raise DocumentTooLongError(tokens, MAX_CONTEXT_TOKENS)
        compression = request.compression.normalized()
        key = f"{compression.method}|{compression.ratio}|{request.tenant}|{request.system}|"
        key += request.text
        context_id = "ctx_" + hashlib.sha256(key.encode()).hexdigest()[:32]
        if context_id in self.contexts:
            return self.contexts[context_id], False
        kept = round(tokens * 4 * compression.ratio)
        info = ContextInfo(
            id=context_id,
            display_name=request.display_name,
            model=self.model_name,
            state="READY",
            create_time=CREATE_TIME,
            context_tokens=tokens,
            compression=CompressionStats(
                method=compression.method,
                ratio=compression.ratio,
                kept_kv_pairs=kept,
                total_kv_pairs=tokens * 4,
                bytes=kept * 256,
                quantization=compression.quantization,
                bytes_full_bf16=tokens * 4 * 256,
            ),
            expire_time=CREATE_TIME + timedelta(seconds=request.ttl_seconds or 3600),
            progress=1.0 if request.wait else 0.25,
        )
        if not request.wait:
            info = replace(info, state="PROCESSING")
        self.contexts[context_id] = info
        self.tenants[context_id] = request.tenant
        return info, True

    def _find(self, context_id: str, tenant: str = "") -> ContextInfo:
        if context_id not in self.contexts or tenant not in (self.tenants[context_id], ANY_TENANT):
            raise ContextNotFoundError(context_id)
        return self.contexts[context_id]

    async def get_context(self, context_id: str, tenant: str = "") -> ContextInfo:
        """A PROCESSING context advances by half its remaining way on every read."""
        self._enter("get_context")
        info = self._find(context_id, tenant)
        if info.state == "PROCESSING":
            progress = info.progress + 0.5
            state = "READY" if progress >= 1.0 else "PROCESSING"
            info = replace(info, state=state, progress=min(progress, 1.0))
            self.contexts[context_id] = info
        return info

    async def delete_context(self, context_id: str, tenant: str = "") -> None:
        self._enter("delete_context")
        self._find(context_id, tenant)
        del self.contexts[context_id]

    async def list_contexts(
        self, tenant: str = "", page_size: int = 50, page_token: str | None = None
    ) -> ContextPage:
        self._enter("list_contexts")
        self.listings.append((tenant, page_size, page_token))
        visible = [
            info for cid, info in self.contexts.items() if tenant in (self.tenants[cid], ANY_TENANT)
        ]
        return paginate(visible, page_size, page_token)

    async def update_context(
        self, context_id: str, expire_time: datetime, tenant: str = ""
    ) -> ContextInfo:
        self._enter("update_context")
        info = replace(self._find(context_id, tenant), expire_time=expire_time)
        self.contexts[context_id] = info
        self.updates.append((context_id, expire_time, tenant))
        return info

    def _result(self, info: ContextInfo, request: QueryRequest, answer: str) -> QueryResult:
        question_tokens = len(request.question.split())
        return QueryResult(
            answer=answer,
            prompt_tokens=info.context_tokens + question_tokens,
            completion_tokens=3,
            cached_tokens=info.context_tokens,
            timings=QueryTimings(load_s=0.01, ttft_s=0.02, decode_s=0.03),
            finish_reason="stop",
        )

    async def query(self, context_id: str, request: QueryRequest) -> QueryResult:
        self._enter("query")
        info = self._find(context_id, request.tenant)
        self.queries.append((context_id, request))
        return self._result(info, request, "48213")

    async def stream_query(
        self, context_id: str, request: QueryRequest
    ) -> AsyncIterator[QueryEvent]:
        self._enter("stream_query")
        info = self._find(context_id, request.tenant)
        self.queries.append((context_id, request))
        finished = False
        try:
            for word in ANSWER_WORDS:
                await asyncio.sleep(self.delta_pause_s)
                self.streamed_deltas += 1
                yield QueryEvent(delta=word)
            finished = True
            yield QueryEvent(result=self._result(info, request, "".join(ANSWER_WORDS)))
        finally:
            self.stream_closed = self.stream_closed or not finished


@contextmanager
def serving(application: FastAPI) -> Iterator[str]:
    """Run `application` under a real uvicorn server on a free port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(application, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No KVZIP_* variable of the machine running the tests leaks into Settings."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def settings() -> Settings:
    return Settings(max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT)


@pytest.fixture
def fake() -> FakeContextService:
    return FakeContextService()


@pytest.fixture
def client(settings: Settings, fake: FakeContextService) -> Iterator[TestClient]:
    with TestClient(create_app(settings, fake)) as test_client:
        yield test_client
