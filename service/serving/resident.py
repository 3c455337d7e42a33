"""Device-resident LRU of decoded compressed contexts, by bytes.

A request that got a context keeps a Python reference to it, so evicting an entry never
pulls it from under a running request (the reference is the lease).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from service import telemetry
from service.engine.kvcache import CompressedContext


class ResidentContexts:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self._items: OrderedDict[str, CompressedContext] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes_used = 0
        self.hits = self.misses = self.evictions = 0
        telemetry.track_tier("resident", self)

    def get(self, key: str) -> CompressedContext | None:
        with self._lock:
            ctx = self._items.get(key)
            if ctx is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return ctx

    def put(self, key: str, ctx: CompressedContext) -> None:
        if ctx.nbytes > self.capacity:
            return
        with self._lock:
            self._drop(key)
            self._items[key] = ctx
            self.bytes_used += ctx.nbytes
            while self.bytes_used > self.capacity:
                _, old = self._items.popitem(last=False)
                self.bytes_used -= old.nbytes
                self.evictions += 1

    def ids(self, limit: int) -> list[str]:
        """The keys held, most recently used first, at most `limit`."""
        with self._lock:
            return list(reversed(self._items))[:limit]

    def drop(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes_used -= old.nbytes
