#!/usr/bin/env python3
"""Container healthchecks, installed in the images as `kvzip-healthcheck`.

    kvzip-healthcheck api      0 when GET /readyz on this container's KVZIP_PORT answers 200
                               (a worker is alive and Redis answers), else 1
    kvzip-healthcheck worker   0 while this worker's heartbeat key lives in Redis, else 1

The worker check reads the worker's own settings (KVZIP_REDIS_URL, KVZIP_REDIS_PREFIX,
KVZIP_WORKER_NAME or the default name), so it names exactly the key the worker beats.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def api() -> int:
    port = os.environ.get("KVZIP_PORT") or "8000"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"api not ready: {exc}\n")
        return 1


def worker() -> int:
    import redis

    from app.settings import Settings
    from service.serving.distributed.heartbeat import default_worker_name
    from service.serving.distributed.keys import RedisKeys

    settings = Settings()
    if not settings.redis_url:
        sys.stderr.write("KVZIP_REDIS_URL is not set\n")
        return 1
    name = settings.worker_name or default_worker_name(settings.device)
    key = RedisKeys(settings.redis_prefix).heartbeat(name)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
    try:
        alive = bool(client.exists(key))
    except redis.RedisError as exc:
        sys.stderr.write(f"worker {name}: Redis: {exc}\n")
        return 1
    finally:
        client.close()
    if not alive:
        sys.stderr.write(f"worker {name}: no heartbeat ({key})\n")
    return 0 if alive else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    checks = {"api": api, "worker": worker}
    if len(args) != 1 or args[0] not in checks:
        sys.stderr.write("usage: kvzip-healthcheck api|worker\n")
        return 2
    return checks[args[0]]()


if __name__ == "__main__":
    raise SystemExit(main())
