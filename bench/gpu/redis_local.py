"""A throw-away local redis-server for the GPU benchmark (the H200 machine has none installed).

The binary and the shared libraries a minimal distribution may lack are carried in the
git-ignored folder `bench/.cache/redis/` (`redis-server`, `lib/*.so*`); a `redis-server` on
PATH is used when that folder has none. The server listens on 127.0.0.1 on a free port, keeps
nothing on disk (no RDB, no AOF) and is stopped by `stop()` or by leaving the `with` block::

    with LocalRedis() as server:
        client = redis_client(server.url)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

CARRIED = Path(__file__).resolve().parents[1] / ".cache" / "redis"


class RedisUnavailable(RuntimeError):
    """No redis-server binary was found, or it did not start."""


def find_binary(carried: Path = CARRIED) -> tuple[Path, Path | None]:
    """(redis-server path, folder of its carried libraries or None); RedisUnavailable if none."""
    binary = carried / "redis-server"
    if binary.is_file():
        return binary, carried / "lib"
    found = shutil.which("redis-server")
    if found is None:
        raise RedisUnavailable(f"no redis-server in {carried} nor on PATH")
    return Path(found), None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """One redis-server process on 127.0.0.1:<free port>, without persistence."""

    def __init__(self, carried: Path = CARRIED, port: int | None = None) -> None:
        self.binary, self.libs = find_binary(carried)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="redis-local-")
        self._log = Path(self._dir.name) / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        if self.binary.stat().st_mode & 0o111 == 0:
            self.binary.chmod(0o755)
        env = dict(os.environ)
        if self.libs is not None and self.libs.is_dir():
            env["LD_LIBRARY_PATH"] = f"{self.libs}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
        args = [
            str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self._dir.name,
            "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
            "--client-query-buffer-limit", "4gb", "--proto-max-bulk-len", "1gb",
            "--logfile", str(self._log),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self._wait_ready(timeout_s)
        return self.url

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                out = self._log.read_text(errors="replace") if self._log.exists() else ""
                raise RedisUnavailable(f"redis-server exited ({self._proc.returncode}): {out}")
            if _pings(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        """Terminate the server (kill after 5 s) and remove its working folder."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        self._dir.cleanup()

    def __enter__(self) -> LocalRedis:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _pings(port: int) -> bool:
    """True when something on 127.0.0.1:port answers an inline PING with +PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


if __name__ == "__main__":  # manual check: python -m bench.gpu.redis_local
    with LocalRedis() as server:
        print(f"{server.binary} answers at {server.url}")
