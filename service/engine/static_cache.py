"""A preallocated per-request tail for batched, CUDA-graph-capturable decoding.

StaticKVzipCache keeps, per layer, tail keys/values (B, H, capacity, d) and a device
tensor `length` (B,) of tokens already written per row. `update` writes a step's T new
tokens at [length, length + T) with index_copy_ (no reallocation, no host sync), so one
decode step has static shapes and addresses and can be captured once and replayed.
"""

from __future__ import annotations

import torch

from service.engine.kvcache import CompressedContext, KVzipCache

GRANULE = 256
"""Tail capacities are rounded up to this many tokens, so similar requests share one
compiled/captured shape and a growing batch reallocates rarely."""


def bucket(tokens: int, granule: int = GRANULE) -> int:
    """A tail capacity for `tokens` tokens: rounded up to the granule, at least one."""
    return max(granule, -(-tokens // granule) * granule)


class StaticKVzipCache(KVzipCache):
    def __init__(
        self,
        context: CompressedContext | None,
        n_layers: int,
        batch: int,
        capacity: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(context, n_layers)
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.tail_keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.tail_values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, T, d) at each row's current length; return the whole buffers."""
        b, h, t, d = key_states.shape
        idx = self.length.view(b, 1, 1, 1) + torch.arange(t, device=key_states.device).view(
            1, 1, t, 1
        )
        idx = idx.expand(b, h, t, d)  # one scatter per tensor, whatever the batch
        keys, values = self.tail_keys[layer_idx], self.tail_values[layer_idx]
        assert keys is not None and values is not None  # preallocated in __init__
        keys.scatter_(2, idx, key_states)
        values.scatter_(2, idx, value_states)
        return keys, values

    def row(self, b: int) -> StaticKVzipCache:
        """A view of row b (its writes land in this cache's buffers)."""
        view = StaticKVzipCache.__new__(StaticKVzipCache)
        KVzipCache.__init__(view, self.context, len(self.tail_keys))
        view.tail_keys = [None if k is None else k[b : b + 1] for k in self.tail_keys]
        view.tail_values = [None if v is None else v[b : b + 1] for v in self.tail_values]
        view.length = self.length[b : b + 1]
        view.capacity = self.capacity
        return view

    def advance(self, t: int = 1) -> None:
        self.length += t

    def get_seq_length(self, layer_idx: int = 0) -> int:
        base = self.context.seq_len if self.context is not None else 0
        return base  # positions are always passed explicitly; no host sync here


def static_tail_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, T, d) over the static tail k/v (B, H, C, d), where row b holds length[b]
    earlier tokens followed by this step's T: query t sees tail keys j <= length[b] + t.

    Returns out (B, Hq, T, d) in q's dtype and lse (B, Hq, T) fp32. Capture-safe.
    """
    b, hq, t, d = q.shape
    h, c = k.shape[1], k.shape[2]
    g = hq // h
    qg = q.reshape(b, h, g * t, d).float()
    logits = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # (B, H, G*T, C)
    step = torch.arange(t, device=q.device).repeat(g)  # query row -> its t
    limit = length.view(b, 1, 1) + step.view(1, -1, 1)  # (B, G*T, 1)
    cols = torch.arange(c, device=q.device).view(1, 1, c)
    logits = logits.masked_fill((cols > limit).unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), v.float())
    return out.view(b, hq, t, d).to(q.dtype), lse.view(b, hq, t)
