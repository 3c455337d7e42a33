"""The scheduler of one engine: iteration-level (continuous) batching.

Requests join the running batch at step boundaries and leave when done; each row attends to
its own context (different contexts, lengths and kept ratios share every step) and its own
tail. One iteration, on the engine thread:

    1. one decode step for every decoding row, then a token per row (its own sampler);
       rows that end (EOS, max tokens) or were cancelled leave the batch at once;
    2. when no question is being prefilled, waiting requests are admitted, FIFO, while
       the KV budget (tails of the rows + the distinct contexts they attend to) holds them
       and their questions fit `prefill_chunk` tokens together; the head of the queue is
       never skipped, so nobody starves. A longer question is admitted alone;
    3. one forward of at most `prefill_chunk` question tokens: the admitted questions
       together (one padded batch, each row over its own context), or the next chunk of
       the long one, so new arrivals stall running decodes by at most that much compute
       per step.

Beyond `queue_size` waiting requests, `generate` refuses with QueueFullError (503 +
Retry-After). Closing a `generate` iterator (client gone, timeout) frees its row at the
next iteration. Other engine work (ingest) runs between iterations on the same thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import torch

from service import telemetry
from service.config import BatchingConfig
from service.engine.kvcache import CompressedContext
from service.engine.rows import DecodeRows
from service.engine.sampler import RowSampling, sample
from service.errors import QueueFullError
from service.serving.engine_thread import EngineWorker
from service.types import SamplingParams

log = logging.getLogger(__name__)

_END = object()
Emitted = list[tuple["asyncio.Queue[object]", object]]
"""(a request's output queue, a token / _END / an error): what an iteration hands to the
loop. The queue, not the request: the engine thread then holds no reference to a finished
request's context while the loop goes on (its memory is freed as its answer ends)."""
BURST_S = 0.05  # engine-thread time of decode steps before other engine work may run


@dataclass(eq=False)
class _Request:
    context: CompressedContext
    prompt: list[int]
    max_new: int
    sampling: RowSampling
    eos: frozenset[int]
    out: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    prefilled: int = 0
    generated: int = 0
    last: int = 0

    @property
    def tail_tokens(self) -> int:
        return len(self.prompt) + self.max_new + 1


class Scheduler:
    """Continuous batching over one engine (see the module docstring)."""

    def __init__(
        self, model: torch.nn.Module, eos_ids: set[int], thread: EngineWorker,
        config: BatchingConfig,
    ) -> None:  # fmt: skip
        self.thread, self.config = thread, config
        self.rows = DecodeRows(model)  # type: ignore[arg-type]
        self.eos = frozenset(eos_ids)
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: list[_Request] = []  # by row index
        self.pending: list[_Request] = []  # being prefilled, rows after the running ones
        self._wake = asyncio.Event()
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        telemetry.track_scheduler(self)

    async def generate(
        self, context: CompressedContext, prompt: list[int], params: SamplingParams
    ) -> AsyncGenerator[int, None]:
        """Answer token ids for `prompt` after `context` (EOS not included)."""
        sampling = RowSampling.from_params(params)
        request = _Request(context, prompt, params.max_new_tokens, sampling, self.eos)
        with self._lock:  # the engine thread takes from `waiting` too
            if len(self.waiting) >= self.config.queue_size:
                raise QueueFullError(retry_after=1.0)
            self.waiting.append(request)
        self._ensure_loop()
        try:
            while (item := await request.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            request.cancelled = True  # no await: the row frees at the next iteration
            self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def _ensure_loop(self) -> None:
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())

    def _busy(self) -> bool:
        return bool(self.running or self.pending or self.waiting)

    async def _loop(self) -> None:
        """Run bursts of iterations on the engine thread while there is work; tokens reach
        the requests through the event loop as each step ends, so HTTP work overlaps the
        next step."""
        loop = asyncio.get_running_loop()

        def dispatch(emitted: Emitted) -> None:
            for out, item in emitted:
                out.put_nowait(item)

        def burst() -> None:  # engine thread; other engine work waits at most BURST_S
            deadline = time.monotonic() + BURST_S
            while self._busy() and time.monotonic() < deadline:
                if emitted := self._iteration():
                    loop.call_soon_threadsafe(dispatch, emitted)

        while True:
            if not self._busy():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self.thread.run(burst, admit=False)
            except Exception as exc:  # a failed step fails every request in it
                log.exception("decode iteration failed")
                dispatch([(r.out, exc) for r in self._abort_all()])

    def _abort_all(self) -> list[_Request]:
        requests = [*self.running, *self.pending]
        self.running, self.pending = [], []
        self.rows = DecodeRows(self.rows.model)
        return requests

    # -- the engine thread ---------------------------------------------------------------

    def _iteration(self) -> Emitted:
        """One step of every decoding row, one prefill chunk, admission (engine thread)."""
        emitted: Emitted = []
        self._drop_cancelled()
        if self.running:
            started = time.perf_counter()
            tokens = torch.tensor([r.last for r in self.running])
            logits = self.rows.step(tokens)
            chosen = sample(logits, [r.sampling for r in self.running]).tolist()  # synchronises
            telemetry.DECODE_STEP_SECONDS.observe(time.perf_counter() - started)
            for request, token in zip(list(self.running), chosen, strict=True):
                emitted += self._emit(request, int(token))
        if not self.pending:
            self._admit()
        if self.pending:
            emitted += self._prefill_chunk()
        telemetry.BATCH_ROWS.observe(len(self.running))
        return emitted

    def _emit(self, request: _Request, token: int) -> Emitted:
        request.generated += 1
        request.last = token
        out: Emitted = []
        if token not in request.eos:
            out.append((request.out, token))
        if token in request.eos or request.generated >= request.max_new:
            out.append((request.out, _END))
            self._leave(request)
        return out

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.running if r.cancelled]:
            self._leave(request)
        with self._lock:
            if any(r.cancelled for r in self.pending):  # the others start over, first
                self.rows.drop_pending()
                for request in reversed(self.pending):
                    if not request.cancelled:
                        request.prefilled = 0
                        self.waiting.appendleft(request)
                self.pending = []
            if any(r.cancelled for r in self.waiting):
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)

    def _leave(self, request: _Request) -> None:
        b = self.running.index(request)
        moved = self.rows.remove(b)
        last = self.running.pop()
        if moved is not None:
            self.running[b] = last
        if self.pending:  # the last pending row took the slot the running rows gave up
            self.pending.insert(0, self.pending.pop())

    def _kv_bytes(self, extra: list[_Request]) -> int:
        requests = [*self.running, *extra]
        contexts = {id(r.context): r.context.nbytes for r in requests}
        tails = sum(self.rows.tail_bytes(r.tail_tokens) for r in requests)
        return sum(contexts.values()) + tails

    def _admit(self) -> None:
        """Waiting requests into pending rows: FIFO, within the KV budget and the row
        limit, questions together up to `prefill_chunk` tokens (a longer one alone)."""
        chunk = self.config.prefill_chunk
        with self._lock:
            while self.waiting and len(self.running) + len(self.pending) < self.config.max_rows:
                head = self.waiting[0]
                batch = [*self.pending, head]
                if (self.running or self.pending) and (
                    self._kv_bytes(batch) > self.config.kv_budget_bytes
                ):
                    break  # FIFO: the head waits for rows to leave; nobody overtakes it
                if self.pending and sum(len(r.prompt) for r in batch) > chunk:
                    break
                self.pending.append(self.waiting.popleft())
                if len(head.prompt) > chunk:
                    break  # chunked over several iterations, alone
        for request in self.pending:
            self.rows.add(request.context, request.tail_tokens)

    def _prefill_chunk(self) -> Emitted:
        size = self.config.prefill_chunk
        chunks = [r.prompt[r.prefilled : r.prefilled + size] for r in self.pending]
        logits = self.rows.prefill(chunks)
        for request, chunk in zip(self.pending, chunks, strict=True):
            request.prefilled += len(chunk)
        if any(r.prefilled < len(r.prompt) for r in self.pending):
            return []  # only ever a long question alone
        self.rows.activate()
        done, self.pending = self.pending, []
        self.running += done
        tokens = sample(logits, [r.sampling for r in done]).tolist()
        emitted: Emitted = []
        for request, token in zip(done, tokens, strict=True):
            emitted += self._emit(request, int(token))
        return emitted
