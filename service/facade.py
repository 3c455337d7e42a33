"""The one facade app/ talks to. Implementations: service.serving.embedded (model in process)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Protocol

from service.types import (
    ContextInfo,
    ContextPage,
    CreateContextRequest,
    QueryEvent,
    QueryRequest,
    QueryResult,
)


class ContextService(Protocol):
    """Context use cases, transport-agnostic. Every method raises only service.errors."""

    model_name: str

    async def start(self) -> None:
        """Load what is needed (model, storage connections)."""

    async def close(self) -> None:
        """Release threads and connections."""

    def is_ready(self) -> bool:
        """True when a model (or a live worker) can take work."""

    async def create_context(self, request: CreateContextRequest) -> tuple[ContextInfo, bool]:
        """Register a document; returns (resource, created). Idempotent by content hash."""

    async def get_context(self, context_id: str, tenant: str = "") -> ContextInfo:
        """The resource, or ContextNotFoundError."""

    async def delete_context(self, context_id: str, tenant: str = "") -> None:
        """Remove from every tier, or ContextNotFoundError."""

    async def query(self, context_id: str, request: QueryRequest) -> QueryResult:
        """Answer one question from the compressed context."""

    async def list_contexts(
        self, tenant: str = "", page_size: int = 50, page_token: str | None = None
    ) -> ContextPage:
        """The caller's contexts, oldest first, one page at a time."""

    async def update_context(
        self, context_id: str, expire_time: datetime, tenant: str = ""
    ) -> ContextInfo:
        """Change only the expiry of a context."""

    def stream_query(self, context_id: str, request: QueryRequest) -> AsyncIterator[QueryEvent]:
        """Answer one question as text deltas, then one event carrying the QueryResult.

        Closing the iterator early (client gone) cancels the generation.
        """
