"""Admission of decoded contexts: a request holds its context from before the context is
read until the answer ends, so requests waiting for a row never fill memory with contexts.

A request waits here, first come first served, until the distinct contexts held by requests
plus its own fit `budget_bytes` (the scheduler's KV budget). A request on a context already
held joins at no cost; when nothing is held the head is admitted whatever its size, so a
context larger than the budget still answers, alone. Its size is known from its record
before anything is read (`decoded_bytes`). At most `queue_size` requests wait (beyond:
QueueFullError, a 503). Decoded contexts in memory thus stay within the budget, beside the
resident LRU's own `memory_cache_bytes`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.errors import QueueFullError
from service.serving.records import ContextRecord


def decoded_bytes(record: ContextRecord, itemsize: int) -> int:
    """The keys and values of the decoded context (prefix included) in a dtype of `itemsize`
    bytes, from its record; the stored size for a record without the figures."""
    seq = record.context_tokens + record.prefix_tokens
    if not (record.total_kv_pairs and record.context_tokens and record.bytes_full_bf16):
        return record.bytes
    heads = record.total_kv_pairs / record.context_tokens  # layers x KV heads
    per_pair = record.bytes_full_bf16 / (heads * seq) * itemsize / 2  # K and V, one token
    return int((record.kept_kv_pairs + heads * record.prefix_tokens) * per_pair)


@dataclass
class _Held:
    nbytes: int
    users: int = 0


class ContextHolds:
    """The contexts requests hold, within a byte budget (see the module docstring)."""

    def __init__(self, budget_bytes: int, queue_size: int) -> None:
        self.budget_bytes, self.queue_size = budget_bytes, queue_size
        self._held: dict[str, _Held] = {}
        self._waiting: collections.deque[tuple[str, int, asyncio.Future[None]]] = (
            collections.deque()
        )
        self.peak_bytes = 0  # the most ever held at once

    @property
    def held_bytes(self) -> int:
        return sum(held.nbytes for held in self._held.values())

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def hold(self, cid: str, nbytes: int) -> AsyncIterator[None]:
        """Hold context `cid` (about `nbytes` once decoded) for the body."""
        await self._acquire(cid, nbytes)
        try:
            yield
        finally:
            self._release(cid)

    async def _acquire(self, cid: str, nbytes: int) -> None:
        if cid in self._held or (not self._waiting and self._fits(nbytes)):
            self._take(cid, nbytes)
            return
        if len(self._waiting) >= self.queue_size:
            raise QueueFullError(retry_after=1.0)
        entry = (cid, nbytes, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[2]
        except BaseException:  # cancelled (the asker went away)
            if entry[2].done() and not entry[2].cancelled():
                self._release(cid)  # admitted just before: let the next one in
            else:
                with contextlib.suppress(ValueError):  # unless already dropped as done
                    self._waiting.remove(entry)
                self._admit()
            raise

    def _fits(self, nbytes: int) -> bool:
        return not self._held or self.held_bytes + nbytes <= self.budget_bytes

    def _take(self, cid: str, nbytes: int) -> None:
        self._held.setdefault(cid, _Held(nbytes)).users += 1
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def _release(self, cid: str) -> None:
        held = self._held[cid]
        held.users -= 1
        if not held.users:
            del self._held[cid]
        self._admit()

    def _admit(self) -> None:
        """Let waiters in from the head while each fits (or shares a held context)."""
        while self._waiting:
            cid, nbytes, future = self._waiting[0]
            if not future.done() and cid not in self._held and not self._fits(nbytes):
                return
            self._waiting.popleft()
            if not future.done():
                self._take(cid, nbytes)
                future.set_result(None)
