"""The rows of a continuous batch: each row its own compressed context and its own tail.

    rows = DecodeRows(model)
    b = rows.add(context, tail_tokens)     # a pending row (its tail empty)
    logits = rows.prefill([prompt_ids])    # (P, V) fp32: every pending row in one forward
    rows.activate()                        # the pending rows take part in every step
    logits = rows.step(tokens)             # tokens (B,) of the B active rows -> (B, V)
    moved = rows.remove(b)                 # the row's slot is taken by the last one

Rows [0, active) decode; rows [active, active + pending) are being prefilled, together. Tails live
in one `RowsCache`: per layer (slots, H, C, d) buffers that grow (slots and capacity C, both
rounded up) when a request needs more, so memory follows what runs. In every layer the
`kvzip` attention function attends each row to its own context (rows that share a context
in one call) and to its own tail, merged by log-sum-exp (service.engine.attention_hook).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from service.engine.generation import rows_forward, step_logits
from service.engine.kvcache import CompressedContext, KVzipCache
from service.engine.static_cache import GRANULE, StaticKVzipCache, bucket


@dataclass(frozen=True)
class RowsTable:
    """Where each row's context lives, for the one-launch multi-context decode kernel:
    pointers (L, 3, B) int64 on the device (keys, values, cu_lens of row b's context in
    layer l) and the split count of the batch's longest context head."""

    key: tuple[int, ...]
    pointers: torch.Tensor
    splits: int
    contexts: tuple[CompressedContext, ...]  # alive while their addresses are in use
    dtype: torch.dtype | None  # of every context's keys/values; None when they differ

    @staticmethod
    def build(contexts: list[CompressedContext], device: torch.device) -> RowsTable:
        from service.engine.backends import triton_rows

        layers = range(len(contexts[0].layers))
        per_layer = [
            triton_rows.pointer_table(
                [(c.layers[i].keys, c.layers[i].values, c.layers[i].cu_lens) for c in contexts],
                torch.device("cpu"),
            )
            for i in layers
        ]
        heads = contexts[0].layers[0].n_heads
        dtypes = {c.layers[i].keys.dtype for c in contexts for i in layers}
        longest = [c.layers[i].keys.shape[0] for c in contexts for i in layers]
        return RowsTable(
            tuple(id(c) for c in contexts),
            _to_device(torch.stack(per_layer), device),
            triton_rows.splits_for(longest, heads),
            tuple(contexts),
            dtypes.pop() if len(dtypes) == 1 else None,
        )


class RowsCache(StaticKVzipCache):
    """Static tails (slots, H, C, d) per layer, `length` (slots,), and a context per row."""

    def __init__(
        self, model: PreTrainedModel, slots: int, capacity: int
    ) -> None:
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        super().__init__(
            None,
            cfg.num_hidden_layers,
            slots,
            capacity,
            cfg.num_key_value_heads,
            head_dim,
            model.dtype,
            model.device,
        )
        self.contexts: list[CompressedContext | None] = [None] * slots
        self.table: RowsTable | None = None

    @property
    def tail_capacity(self) -> int:
        """Tokens each row's tail holds."""
        k = self.tail_keys[0]
        assert k is not None
        return int(k.shape[2])

    @property
    def slots(self) -> int:
        return len(self.contexts)

    def bytes_per_token(self) -> int:
        """Tail bytes one token of one row takes (keys + values, every layer)."""
        k = self.tail_keys[0]
        assert k is not None
        return 2 * len(self.tail_keys) * k.shape[1] * k.shape[3] * k.element_size()

    def groups(self) -> list[tuple[CompressedContext, torch.Tensor | None]]:
        """The rows grouped by the context they attend to: (context, row index (R,) on the
        device, None when every row shares it). Computed once per view (one step), not per
        layer."""
        cached: list[tuple[CompressedContext, torch.Tensor | None]] | None = getattr(
            self, "_groups", None
        )
        if cached is not None:
            return cached
        rows: dict[int, list[int]] = {}
        for b, ctx in enumerate(self.contexts):
            assert ctx is not None, "every row of a step has a context"
            rows.setdefault(id(ctx), []).append(b)
        device = self.length.device
        if len(rows) == 1:
            cached = [(self.contexts[0], None)]  # type: ignore[list-item]
        else:
            cached = [
                (self.contexts[r[0]], _index(r, device))  # type: ignore[misc]
                for r in rows.values()
            ]
        self._groups = cached
        return cached

    def view(self, start: int, stop: int) -> RowsCache:
        """Rows [start, stop): writes land in this cache's buffers."""
        view = RowsCache.__new__(RowsCache)
        KVzipCache.__init__(view, None, len(self.tail_keys))
        view.tail_keys = [None if k is None else k[start:stop] for k in self.tail_keys]
        view.tail_values = [None if v is None else v[start:stop] for v in self.tail_values]
        view.length = self.length[start:stop]
        view.capacity = self.capacity
        view.contexts = self.contexts[start:stop]
        view.table = None
        return view

    def grown(self, model: PreTrainedModel, slots: int, capacity: int) -> RowsCache:
        """A larger cache holding this one's rows."""
        c = self.tail_capacity
        bigger = RowsCache(model, max(slots, self.slots), max(capacity, c))
        n = self.slots
        olds = self.tail_keys + self.tail_values
        for old, new in zip(olds, bigger.tail_keys + bigger.tail_values, strict=True):
            assert old is not None and new is not None
            new[:n, :, :c].copy_(old)
        bigger.length[:n].copy_(self.length)
        bigger.contexts[:n] = self.contexts
        return bigger

    def move(self, src: int, dst: int) -> None:
        """Row `src` into slot `dst` (its tail, length and context)."""
        for buf in self.tail_keys + self.tail_values:
            assert buf is not None
            buf[dst].copy_(buf[src])
        self.length[dst] = self.length[src]
        self.contexts[dst] = self.contexts[src]
        self.contexts[src] = None


class DecodeRows:
    """Rows of one model's continuous batch (see the module docstring). Not thread-safe."""

    def __init__(self, model: PreTrainedModel, slots: int = 4, capacity: int = GRANULE) -> None:
        self.model = model
        self.cache = RowsCache(model, slots, bucket(capacity))
        self.active = 0
        self.pending = 0  # rows [active, active + pending) are being prefilled

    def tail_bytes(self, tokens: int) -> int:
        """Bytes a row whose tail holds `tokens` tokens needs (capacity granules)."""
        return bucket(tokens) * self.cache.bytes_per_token()

    def add(self, context: CompressedContext, tail_tokens: int) -> int:
        """A pending row for a request over `context` whose tail needs `tail_tokens`."""
        b = self.active + self.pending
        slots = b + 1 if b + 1 <= self.cache.slots else 2 * self.cache.slots
        if slots > self.cache.slots or tail_tokens > self.cache.tail_capacity:
            capacity = bucket(max(tail_tokens, self.cache.tail_capacity))
            self.cache = self.cache.grown(self.model, slots, capacity)
        self.cache.contexts[b] = context
        self.cache.length[b] = 0
        self.pending += 1
        return b

    def prefill(self, chunks: list[list[int]]) -> torch.Tensor:
        """Append chunks[i] to pending row active + i, every pending row in one forward
        (right-padded to the longest chunk); the logits after each chunk's last token
        (P, V) fp32. A row may be prefilled chunk by chunk."""
        assert len(chunks) == self.pending and all(chunks)
        first, k = self.active, self.pending
        view = self.cache.view(first, first + k)
        width = max(len(c) for c in chunks)
        device = self.model.device
        ids = torch.tensor([c + [0] * (width - len(c)) for c in chunks], device=device)
        bases = torch.tensor([c.seq_len for c in view.contexts if c is not None], device=device)
        positions = (bases + view.length).view(k, 1) + torch.arange(width, device=device)
        last = torch.tensor([len(c) - 1 for c in chunks], device=device)
        logits = rows_forward(self.model, ids, positions, view, last)
        view.length += torch.tensor([len(c) for c in chunks], device=device)
        return logits

    def activate(self) -> None:
        """The prefilled rows join the decoding rows."""
        self.active += self.pending
        self.pending = 0

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) for the B active rows -> next-token logits (B, V) fp32."""
        b = self.active
        view = self.cache.view(0, b)
        view.table = self._table(view)
        bases = torch.tensor([c.seq_len for c in view.contexts if c is not None])
        positions = (bases.to(view.length.device) + view.length).view(b, 1)
        logits = step_logits(self.model, tokens.view(b, 1).to(self.model.device), positions, view)
        view.length += 1
        return logits

    def _table(self, view: RowsCache) -> RowsTable | None:
        """The pointer table of the active rows on CUDA (rebuilt only when the rows'
        contexts change), None elsewhere."""
        if self.model.device.type != "cuda":
            return None
        contexts = [c for c in view.contexts if c is not None]
        key = tuple(id(c) for c in contexts)
        if self.cache.table is None or self.cache.table.key != key:
            self.cache.table = RowsTable.build(contexts, self.model.device)
        return self.cache.table

    def remove(self, b: int) -> int | None:
        """Free active row b; the last active row moves into its slot (its old index is
        returned, None when nothing moved). Pending rows stay right after the active ones:
        the last pending row moves into the slot the active rows gave up."""
        last = self.active - 1
        moved = None
        if b != last:
            self.cache.move(last, b)
            moved = last
        else:
            self.cache.contexts[b] = None
        self.active -= 1
        if self.pending:
            self.cache.move(self.active + self.pending, self.active)
        return moved

    def drop_pending(self) -> None:
        """Forget every pending row (their requests start over)."""
        for b in range(self.active, self.active + self.pending):
            self.cache.contexts[b] = None
        self.pending = 0


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row indices (R,) on `device` without a blocking copy (pinned staging on CUDA)."""
    return _to_device(torch.tensor(rows), device)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device` without a blocking copy (pinned staging on CUDA)."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
