"""The one facade app/ talks to. Implementations: service.embedded (model in process)."""

from __future__ import annotations

from typing import Protocol

from service.types import ContextInfo, CreateContextRequest, QueryRequest, QueryResult


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
