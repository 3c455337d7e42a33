"""A typed Python client of the KVzip service (httpx; blocking and asyncio).

    from kvzip.client import Client

    with Client("http://127.0.0.1:8000", api_key="sk-...") as kvzip:
        context = kvzip.create_context(open("report.txt").read(), ttl_seconds=7200)
        print(kvzip.query(context.id, "What is the pass key?").answer)
        with kvzip.stream_query(context.id, "Summarise it.") as stream:
            for delta in stream:
                print(delta, end="")
        print(stream.result.usage)

`AsyncClient` has the same methods, awaited. Results are the dataclasses of
`kvzip.client.types`; failures raise the exceptions of `kvzip.client.errors`. docs/api.md
("Python client") has more.
"""

from kvzip.client.aio import AsyncClient, AsyncTextStream
from kvzip.client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    ConflictError,
    ContextFailedError,
    InvalidRequestError,
    KVzipError,
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    RequestTooLargeError,
    ServerError,
    UnauthorizedError,
    WaitTimeoutError,
)
from kvzip.client.plans import ChatOptions, CompressionSpec, CreateOptions, QueryOptions
from kvzip.client.sync import Client, TextStream
from kvzip.client.types import (
    Answer,
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    Compression,
    Context,
    ContextPage,
    ContextUsage,
    Model,
    PromptTokensDetails,
    Timings,
    Usage,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "Answer",
    "AsyncClient",
    "AsyncTextStream",
    "ChatChoice",
    "ChatCompletion",
    "ChatMessage",
    "ChatOptions",
    "Client",
    "Compression",
    "CompressionSpec",
    "ConflictError",
    "Context",
    "ContextFailedError",
    "ContextPage",
    "ContextUsage",
    "CreateOptions",
    "InvalidRequestError",
    "KVzipError",
    "Model",
    "NotFoundError",
    "OverloadedError",
    "PromptTokensDetails",
    "QueryOptions",
    "RateLimitedError",
    "RequestTooLargeError",
    "ServerError",
    "TextStream",
    "Timings",
    "UnauthorizedError",
    "Usage",
    "WaitTimeoutError",
]
