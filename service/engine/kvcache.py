"""The compressed context (immutable, ragged, shareable), the per-request cache, and the
document a context is built from.

A `CompressedContext` holds, per layer, every kept key/value pair head-major and flat:
keys/values (N, d), cu_lens (H+1,) int32, scores (N,) fp32 (+inf for the protected prefix)
and positions (N,) int32 (original token positions; keys are stored after RoPE).

A `KVzipCache` is what the model sees during one forward: a reference to a context plus a
dense per-request tail (question + generated tokens, or a reconstruction prompt). The
context is never written; the tail grows. Nothing is rolled back after a request.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from transformers import Cache


@dataclass(frozen=True)
class Document:
    """Token ids of one registered document: protected prefix + context."""

    prefix_ids: list[int]
    context_ids: list[int]

    @property
    def all_ids(self) -> list[int]:
        return self.prefix_ids + self.context_ids


@dataclass(frozen=True)
class RaggedLayer:
    """One layer of a compressed context; see the module docstring for the shapes."""

    keys: torch.Tensor
    values: torch.Tensor
    cu_lens: torch.Tensor
    scores: torch.Tensor
    positions: torch.Tensor

    @property
    def n_heads(self) -> int:
        return self.cu_lens.numel() - 1

    @property
    def lens(self) -> torch.Tensor:
        """(H,) number of kept pairs per KV head (prefix included)."""
        return self.cu_lens[1:] - self.cu_lens[:-1]

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    @functools.cached_property
    def max_len(self) -> int:
        """The longest KV head (one device read, then cached: the layer is immutable)."""
        return int(self.lens.max()) if self.n_heads else 0

    def head(self, h: int) -> slice:
        """Row range of KV head h in keys/values/scores/positions."""
        bounds = self.cu_lens.tolist()
        return slice(bounds[h], bounds[h + 1])

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, T, d) views of keys and values; only valid when every head keeps T pairs."""
        h = self.n_heads
        return self.keys.view(h, -1, self.keys.shape[-1]), self.values.view(
            h, -1, self.values.shape[-1]
        )

    @staticmethod
    def from_dense(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> RaggedLayer:
        """keys/values (H, T, d), scores (H, T) -> a layer that keeps every pair."""
        h, t, d = keys.shape
        cu = torch.arange(h + 1, dtype=torch.int32, device=keys.device) * t
        pos = torch.arange(t, dtype=torch.int32, device=keys.device).repeat(h)
        return RaggedLayer(
            keys.reshape(h * t, d).contiguous(),
            values.reshape(h * t, d).contiguous(),
            cu,
            scores.reshape(h * t).float().contiguous(),
            pos,
        )

    def keep(self, mask: torch.Tensor) -> RaggedLayer:
        """The layer restricted to rows where mask (N,) is True; order is preserved."""
        idx = mask.nonzero().squeeze(1)
        head_of_row = torch.repeat_interleave(
            torch.arange(self.n_heads, device=mask.device), self.lens.long()
        )
        counts = torch.bincount(head_of_row[idx], minlength=self.n_heads)
        cu = torch.zeros(self.n_heads + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = counts.cumsum(0)
        return RaggedLayer(
            self.keys[idx].contiguous(),
            self.values[idx].contiguous(),
            cu,
            self.scores[idx].contiguous(),
            self.positions[idx].contiguous(),
        )


@dataclass(frozen=True)
class CompressedContext:
    """An immutable compressed KV cache of prefix + context tokens.

    context_ids: (s + n,) int32 token ids of the prefix and the context.
    """

    layers: tuple[RaggedLayer, ...]
    context_ids: torch.Tensor
    prefix_len: int
    method: str
    ratio: float
    chunk_size: int
    created_at: float

    @property
    def seq_len(self) -> int:
        """s + n: the position the first question token takes."""
        return int(self.context_ids.numel())

    @property
    def context_len(self) -> int:
        return self.seq_len - self.prefix_len

    @property
    def total_pairs(self) -> int:
        """L * H * n: context KV pairs before compression."""
        return sum(layer.n_heads for layer in self.layers) * self.context_len

    @property
    def kept_pairs(self) -> int:
        """Context KV pairs kept (the protected prefix is not counted)."""
        prefix = sum(layer.n_heads for layer in self.layers) * self.prefix_len
        return sum(int(layer.keys.shape[0]) for layer in self.layers) - prefix

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def with_layers(
        self, layers: tuple[RaggedLayer, ...], ratio: float | None = None
    ) -> CompressedContext:
        """The same context with other layers (and, after a selection, its new ratio)."""
        return replace(self, layers=layers, ratio=self.ratio if ratio is None else ratio)


class KVzipCache(Cache):
    """A transformers Cache: a read-only context plus a growing dense per-request tail.

    `update` appends the new keys/values (B, H, T, d) to the tail and returns the whole
    tail; the registered `kvzip` attention function reads the context from here.
    """

    def __init__(
        self, context: CompressedContext | None, n_layers: int, capacity: int | None = None
    ) -> None:
        super().__init__(layers=[])
        self.context = context
        self.capacity = capacity  # preallocate the tail (prefill: no O(n^2) re-copying)
        self.tail_keys: list[torch.Tensor | None] = [None] * n_layers
        self.tail_values: list[torch.Tensor | None] = [None] * n_layers
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.scorer: object | None = None

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.capacity is not None:
            return self._write(key_states, value_states, layer_idx)
        old_k, old_v = self.tail_keys[layer_idx], self.tail_values[layer_idx]
        if old_k is not None and old_v is not None:
            key_states = torch.cat([old_k, key_states], dim=2)
            value_states = torch.cat([old_v, value_states], dim=2)
        self.tail_keys[layer_idx], self.tail_values[layer_idx] = key_states, value_states
        return key_states, value_states

    def _write(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append into the preallocated (B, H, capacity, d) buffers; return the filled views."""
        assert self.capacity is not None
        if self._buffers[layer_idx] is None:
            b, h, _, d = key_states.shape
            shape = (b, h, self.capacity, d)
            self._buffers[layer_idx] = (key_states.new_empty(shape), value_states.new_empty(shape))
        keys, values = self._buffers[layer_idx]  # type: ignore[misc]
        start, end = self.tail_len(layer_idx), self.tail_len(layer_idx) + key_states.shape[2]
        if end > self.capacity:
            raise ValueError(f"tail capacity {self.capacity} exceeded ({end} tokens)")
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self.tail_keys[layer_idx], self.tail_values[layer_idx] = (
            keys[:, :, :end],
            values[:, :, :end],
        )
        return keys[:, :, :end], values[:, :, :end]

    def tail_len(self, layer_idx: int = 0) -> int:
        k = self.tail_keys[layer_idx]
        return 0 if k is None else int(k.shape[2])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        base = self.context.seq_len if self.context is not None else 0
        return base + self.tail_len(layer_idx)

    @property
    def is_compileable(self) -> bool:
        return False
