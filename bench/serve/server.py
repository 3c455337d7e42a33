"""The real app under a real uvicorn server, in this process, on a free loopback port.

    with serving(create_app(settings, service=service)) as base_url:
        ...  # http://127.0.0.1:<port>

The server runs its own event loop on a thread, so the load generator's loop (the caller's)
and the server's do not share one loop; they share the process (and its GIL), which a
loopback client in another process would not. Sockets, HTTP parsing, the middleware and SSE
framing are the production ones.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

__all__ = ["serving"]


@contextmanager
def serving(
    app: FastAPI, start_timeout_s: float = 600.0, log_level: str = "warning"
) -> Iterator[str]:
    """Serve `app` on 127.0.0.1:<free port> until the block ends; yields the base URL.

    start_timeout_s bounds the lifespan (model load included); the shutdown waits 60 s.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped while starting (see its log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the server did not start within {start_timeout_s} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
