"""Parallel reads of a Redis tier object's parts straight into one buffer, checked on arrival.

A `PartFetcher` keeps up to `workers` blocking connections of its own, opened with the
settings of the tier's asyncio client (host and port or unix socket, db, credentials, TLS),
and one thread per connection. Reading an object gives part i to connection i mod
`workers`; each connection asks for its parts in windows of `window_bytes` (GETRANGE, at
most `depth` windows in flight, so the server never queues more than workers x depth x
window_bytes of replies), receives each window with `recv_into` at its final place in the
destination (no intermediate buffer), and feeds the part's sha256 every `HASH_STEP` bytes
while they are still in the CPU cache. hashlib and socket reads release the GIL, so the
connections receive and hash in parallel.

redis-py is not used for these replies: its parsers copy every bulk reply at least twice
(socket buffer -> the parser's buffer -> a new bytes object), then the parts are joined
once more (`python -m bench.redis_read` compares the two).

A part that is missing (nil, or an empty GETRANGE reply), of another size, of another type
or failing its checksum makes the read `False` (the caller treats the object as broken);
the other connections stop at their next window. Socket errors and timeouts propagate
(`OSError`), as do unexpected server errors (`RedisError`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import InvalidResponse, ResponseError

HASH_STEP = 1 << 20
_RECV_LINE = 1 << 12


@dataclass(frozen=True, slots=True)
class Window:
    """Bytes `start` to `stop` of part `index`, which lives at `offset` of the object."""

    index: int
    offset: int
    start: int
    stop: int
    last: bool


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to open a blocking connection: the asyncio client's own settings."""

    host: str
    port: int
    path: str | None
    db: int
    credentials: tuple[str, ...]
    timeout_s: float | None
    connect_timeout_s: float | None
    tls: ssl.SSLContext | None

    @classmethod
    def of_client(cls, client: Redis) -> Endpoint:
        """The endpoint of `client`'s connections (an unconnected one is built to read them)."""
        pool = client.connection_pool
        conn: Any = pool.connection_class(**pool.connection_kwargs)
        provider = conn.credential_provider
        if provider is not None:
            credentials = tuple(provider.get_credentials())
        elif conn.password is not None:
            credentials = tuple(c for c in (conn.username, conn.password) if c is not None)
        else:
            credentials = ()
        tls = getattr(conn, "ssl_context", None)
        return cls(
            host=getattr(conn, "host", "localhost"),
            port=int(getattr(conn, "port", 6379)),
            path=getattr(conn, "path", None),
            db=int(conn.db or 0),
            credentials=credentials,
            timeout_s=conn.socket_timeout,
            connect_timeout_s=conn.socket_connect_timeout,
            tls=None if tls is None else tls.get(),
        )

    def connect(self) -> Stream:
        """A new authenticated connection on the right database."""
        if self.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.connect_timeout_s)
            try:
                sock.connect(self.path)
            except BaseException:
                sock.close()
                raise
        else:
            address = (self.host, self.port)
            sock = socket.create_connection(address, timeout=self.connect_timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        sock.settimeout(self.timeout_s)
        stream = Stream(sock)
        try:
            if self.credentials:
                stream.simple("AUTH", *self.credentials)
            if self.db:
                stream.simple("SELECT", str(self.db))
        except BaseException:
            stream.close()
            raise
        return stream


def _command(*args: str | bytes) -> bytes:
    """`args` as a RESP array of bulk strings."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Stream:
    """One blocking connection: commands out, replies in, bulk replies into the caller's view."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._pending = b""  # bytes received past the last reply consumed

    def close(self) -> None:
        """Close the socket (its unread replies go with it)."""
        self.sock.close()

    def send(self, *args: str | bytes) -> None:
        """Send one command (its reply is read later)."""
        self.sock.sendall(_command(*args))

    def simple(self, *args: str) -> None:
        """Send a command whose reply is a status (+OK); an error reply raises ResponseError."""
        self.send(*args)
        line = self._line()
        if not line.startswith(b"+"):
            raise ResponseError(line[1:].decode(errors="replace"))

    def bulk_into(self, view: memoryview, hasher: Any) -> bool:
        """Read one bulk reply into `view`, feeding `hasher`; False when the reply is nil, of
        another length than `view` or a WRONGTYPE error (the stream is then out of step)."""
        line = self._line()
        kind = line[:1]
        if kind == b"-":
            if line.startswith(b"-WRONGTYPE"):
                return False
            raise ResponseError(line[1:].decode(errors="replace"))
        if kind == b"_":  # RESP3 null
            return False
        if kind != b"$":
            raise InvalidResponse(f"unexpected reply {line[:40]!r}")
        if int(line[1:]) != len(view):
            return False
        self._exact_into(view, hasher)
        self._skip_crlf()
        return True

    def _exact_into(self, view: memoryview, hasher: Any) -> None:
        size = len(view)
        done = min(size, len(self._pending))
        view[:done] = self._pending[:done]
        self._pending = self._pending[done:]
        hashed = 0
        while done < size:
            got = self.sock.recv_into(view[done:], size - done)
            if not got:
                raise ConnectionError("redis closed the connection mid-reply")
            done += got
            if done - hashed >= HASH_STEP:
                hasher.update(view[hashed:done])
                hashed = done
        if hashed < size:
            hasher.update(view[hashed:size])

    def _skip_crlf(self) -> None:
        while len(self._pending) < 2:
            self._fill()
        self._pending = self._pending[2:]

    def _line(self) -> bytes:
        while (end := self._pending.find(b"\r\n")) < 0:
            self._fill()
        line, self._pending = self._pending[:end], self._pending[end + 2 :]
        return line

    def _fill(self) -> None:
        chunk = self.sock.recv(_RECV_LINE)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self._pending += chunk


def windows(sizes: Sequence[int], window_bytes: int) -> list[list[Window]]:
    """The windows of every part, one list per part, parts laid out back to back."""
    out: list[list[Window]] = []
    offset = 0
    for index, size in enumerate(sizes):
        starts = range(0, size, window_bytes)
        out.append(
            [
                Window(index, offset, a, min(a + window_bytes, size), a + window_bytes >= size)
                for a in starts
            ]
        )
        offset += size
    return out


class _Resources:
    """The idle connections and the threads of one fetcher, closed together (explicitly, or
    when the fetcher is collected: an open socket must not reach the garbage collector)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[Stream] = []
        self.executor: ThreadPoolExecutor | None = None
        self.pid = os.getpid()

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
            executor, self.executor = self.executor, None
        for stream in idle:
            stream.close()
        if executor is not None:
            executor.shutdown(wait=False)


class PartFetcher:
    """Reads parts on up to `workers` connections of its own; see the module docstring."""

    def __init__(self, endpoint: Endpoint, workers: int, window_bytes: int, depth: int) -> None:
        if workers < 1 or window_bytes < 1 or depth < 1:
            raise ValueError("workers, window_bytes and depth must be >= 1")
        self.endpoint = endpoint
        self.workers = workers
        self.window_bytes = window_bytes
        self.depth = depth
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.close)

    async def fetch(
        self, keys: Sequence[str], sizes: Sequence[int], digests: Sequence[str], out: memoryview
    ) -> bool:
        """Parts `keys` (of `sizes`, sha256 hex `digests`) into `out`, back to back: True when
        every part arrived whole and verified."""
        if sum(sizes) != len(out):
            raise ValueError("the destination is not the size of the parts")
        per_part = windows(sizes, self.window_bytes)
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        executor = self._executor()
        lanes = [range(w, len(keys), self.workers) for w in range(min(self.workers, len(keys)))]
        jobs = [
            loop.run_in_executor(
                executor, self._lane, [(keys[i], digests[i], per_part[i]) for i in lane], out, stop
            )
            for lane in lanes
        ]
        try:
            results = await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            stop.set()  # when cancelled: the lanes stop at their next window
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return all(results)

    def close(self) -> None:
        """Close the idle connections and let the threads go (a later fetch starts again)."""
        self._res.close()

    def _executor(self) -> ThreadPoolExecutor:
        res = self._res
        with res.lock:
            if res.pid != os.getpid():  # forked: the parent's sockets and threads are not ours
                res.idle, res.executor, res.pid = [], None, os.getpid()
            if res.executor is None:
                res.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="redis-read")
            return res.executor

    def _acquire(self) -> Stream:
        with self._res.lock:
            if self._res.idle:
                return self._res.idle.pop()
        return self.endpoint.connect()

    def _release(self, stream: Stream) -> None:
        with self._res.lock:
            if len(self._res.idle) < self.workers:
                self._res.idle.append(stream)
                return
        stream.close()

    def _lane(
        self, parts: list[tuple[str, str, list[Window]]], out: memoryview, stop: threading.Event
    ) -> bool:
        """One connection's parts, `depth` windows in flight; False on a broken part."""
        try:
            stream = self._acquire()
        except BaseException:
            stop.set()
            raise
        clean = False
        try:
            ok = self._receive(stream, parts, out, stop)
            clean = ok
            return ok
        finally:
            if not clean:
                stop.set()
            (self._release if clean else Stream.close)(stream)

    def _receive(
        self,
        stream: Stream,
        parts: list[tuple[str, str, list[Window]]],
        out: memoryview,
        stop: threading.Event,
    ) -> bool:
        todo = [(key, w) for key, _, ws in parts for w in ws]
        digests = {ws[0].index: digest for _, digest, ws in parts}
        sent = 0
        hasher = hashlib.sha256()
        for received, (_, w) in enumerate(todo):
            if stop.is_set():
                return False
            while sent < len(todo) and sent - received < self.depth:
                key, ahead = todo[sent]
                stream.send("GETRANGE", key, str(ahead.start), str(ahead.stop - 1))
                sent += 1
            if not stream.bulk_into(out[w.offset + w.start : w.offset + w.stop], hasher):
                return False
            if w.last:
                if hasher.hexdigest() != digests[w.index]:
                    return False
                hasher = hashlib.sha256()
        return True
