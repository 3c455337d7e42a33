"""Domain errors of the engine and the context use cases.

The tree (app/errors.py maps each leaf to one HTTP status)::

    ServiceError                      root of everything service/ raises on purpose
    ├── InvalidInputError             a request that can never succeed (empty text, bad ratio)
    ├── DocumentTooLongError          document + room for a question exceeds the model window
    ├── QuestionTooLongError          question (+ chat turns) + answer exceed what the window leaves
    ├── ContextNotFoundError          unknown, expired, deleted or another tenant's context id
    ├── ContextNotReadyError          the context exists but is still processing or failed
    ├── ContextLostError              a READY context whose stored cache no tier holds intact
    │                                 any more (evicted, expired there, or corrupt): FAILED now
    ├── IncompatibleContextError      a stored object made by another model/tokenizer/format
    ├── CorruptContextError           a stored object that does not parse
    ├── TooManyContextsError          the tenant holds its quota of contexts
    ├── StorageQuotaExceededError     the tenant's stored bytes reached its quota
    ├── StorageFullError              the disk tier cannot hold the context
    ├── QueueFullError                the bounded work queue is full (retry later)
    └── EngineUnavailableError        no model loaded / no live worker
"""

from __future__ import annotations


class ServiceError(Exception):
    """Root of every error raised on purpose by service/."""


class InvalidInputError(ServiceError):
    """The request can never succeed as given (empty document, ratio out of range...)."""


class UnsupportedRatioError(InvalidInputError):
    """A kept ratio below the floor a compression method was measured to need
    (`kvzip_head` below ServiceConfig.kvzip_head_min_ratio: docs/quality.md)."""


class DocumentTooLongError(ServiceError):
    """The document does not fit the model window with room left for a question."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(
            f"document is {tokens} tokens; this model accepts at most {limit} context tokens "
            f"(its window minus room reserved for the question and answer)"
        )
        self.tokens = tokens
        self.limit = limit


class QuestionTooLongError(ServiceError):
    """The question side of the prompt (instructions, earlier turns, the question) does not
    fit what the model window leaves after the context and the answer's max_new_tokens."""

    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(
            f"the question side of the prompt is {tokens} tokens; this context leaves room for "
            f"{budget} (the model window minus the context and max_new_tokens)"
        )
        self.tokens = tokens
        self.budget = budget


class ContextNotFoundError(ServiceError):
    """No context with this id is visible to the caller."""

    def __init__(self, context_id: str) -> None:
        super().__init__(f"context {context_id!r} not found")
        self.context_id = context_id


class ContextNotReadyError(ServiceError):
    """The context exists but cannot answer yet (PROCESSING) or ever (FAILED)."""


class ContextLostError(ServiceError):
    """A READY context whose stored cache is gone from every tier, or failed its checksum
    everywhere: it turned FAILED; registering the same document again rebuilds it."""

    def __init__(self, context_id: str, reason: str = "", *, message: str | None = None) -> None:
        super().__init__(
            message
            or f"context {context_id!r} lost its stored cache ({reason}); it is FAILED now: "
            "register the same document again to rebuild it"
        )
        self.context_id = context_id


class TooManyContextsError(ServiceError):
    """The tenant already holds as many contexts as its quota allows."""


class StorageQuotaExceededError(ServiceError):
    """The tenant's stored contexts already take as many bytes as its quota allows."""


class StorageFullError(ServiceError):
    """The disk tier cannot hold the compressed context (larger than its capacity, or the
    disk is full with nothing left to evict)."""


class IncompatibleContextError(ServiceError):
    """A stored compressed context was made by another model, tokenizer or format version."""


class CorruptContextError(ServiceError):
    """A stored compressed context does not parse."""


class QueueFullError(ServiceError):
    """The bounded work queue is full; the caller should retry after `retry_after` seconds."""

    def __init__(self, retry_after: float = 1.0) -> None:
        super().__init__("the work queue is full, retry later")
        self.retry_after = retry_after


class EngineUnavailableError(ServiceError):
    """No engine can take the work (model not loaded, no live worker, storage down)."""


def public_message(exc: BaseException, doing: str) -> str:
    """What a tenant may read of `exc`: a domain error's own message; of anything else, only
    its class and what was being done (`doing`, e.g. "ingesting"): the details, which may
    name files, devices or internals, go to the server's log."""
    if isinstance(exc, ServiceError):
        return str(exc)
    return f"internal error while {doing} ({type(exc).__name__}); details are in the server log"
