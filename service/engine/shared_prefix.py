"""The rows a version 3 (quantized) object stores: the context's, with kept tokens as bits.

Every head of every layer of a context holds the prefix rows first (the chat template
before the document, positions 0..s-1, score +inf, always kept). They are the same for
every context of one model and system prompt, and at ratio 0.3 of a 1.4K-token document
they are 8% of the stored rows, so a version 3 object leaves them out: `split` drops them
before quantization and `plan_merge` / `merged_layer` put back the engine's own,
unquantized ones when loading (`KVzipEngine.prefix_context`, one short prefill per prefix
and process).

Which context tokens each head kept is a bit mask, 1 bit per (head, context token), in
`pack_bits`' layout, instead of a position per kept row (2 or 4 bytes); cu_lens and
positions follow from it, since a head's rows are in position order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from service.engine.kvcache import RaggedLayer
from service.engine.quantization import head_of_row
from service.errors import CorruptContextError

_BITS = torch.arange(8, dtype=torch.uint8)


def split(
    layer: RaggedLayer, prefix_len: int, context_len: int
) -> tuple[RaggedLayer, torch.Tensor]:
    """(the layer without its prefix rows, the kept mask (H, ceil(context_len / 8)) uint8).

    ValueError unless every head holds the whole prefix and its rows in position order
    (what prefill and selection make).
    """
    n_rows = layer.keys.shape[0]
    head = head_of_row(layer.cu_lens, n_rows)
    positions = layer.positions.long()
    later = head[1:] == head[:-1]
    if n_rows and bool((positions[1:] <= positions[:-1])[later].any()):
        raise ValueError("a head's rows are not in position order")
    if n_rows and not 0 <= int(positions.min()) <= int(positions.max()) < prefix_len + context_len:
        raise ValueError("a row's position is outside the context")
    is_prefix = positions < prefix_len
    per_head = torch.bincount(head[is_prefix], minlength=layer.n_heads)
    if bool((per_head != prefix_len).any()):
        raise ValueError("a head does not hold the whole prefix")
    rest = ~is_prefix
    kept = torch.zeros(layer.n_heads, context_len, dtype=torch.bool, device=positions.device)
    kept[head[rest], positions[rest] - prefix_len] = True
    return layer.keep(rest), pack_bits(kept)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(H, n) bool -> (H, ceil(n / 8)) uint8, token t at bit t % 8 of byte t // 8."""
    h, n = mask.shape
    padded = torch.zeros(h, -(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :n] = mask
    bits = padded.view(h, -1, 8) << _BITS.to(mask.device)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_layers(packed: Sequence[torch.Tensor], n: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Every layer's kept mask (H, ceil(n / 8)) in `pack_bits`' layout -> (the masks
    (L, H, n) bool, per layer the kept rows of each head as host ints), in a few launches
    and one device synchronisation for all layers. CorruptContextError for a wrong size or
    a set padding bit."""
    for bits in packed:
        if bits.dtype != torch.uint8 or bits.ndim != 2 or bits.shape[1] != -(-n // 8):
            raise CorruptContextError(
                f"stored kept mask {tuple(bits.shape)} {bits.dtype} does not fit {n} tokens"
            )
    if len({bits.shape for bits in packed}) > 1:
        raise CorruptContextError("stored kept masks differ between layers in their heads")
    if not packed:
        return torch.zeros(0, 0, n, dtype=torch.bool), []
    stacked = torch.stack(list(packed))  # (L, H, m)
    bits = ((stacked[..., None] >> _BITS.to(stacked.device)) & 1).flatten(2).bool()
    masks = bits[..., :n]
    counts = torch.cat([masks.sum(2).flatten(), bits[..., n:].sum().view(1)]).tolist()
    if counts[-1]:
        raise CorruptContextError("stored kept mask marks tokens past the context")
    h = stacked.shape[1]
    return masks, [counts[i : i + h] for i in range(0, len(counts) - 1, h)]


@dataclass(frozen=True)
class MergePlan:
    """Where the rows of every layer of a version 3/4 object go once the prefix rows are put
    back in front of each head's context rows (`plan_merge`); L layers of H heads, s prefix
    rows per head, K stored (context) rows in all, R merged rows in all.

    lens: per layer, each head's context rows (host ints); ctx_cu: (L, H+1) int32 their row
    offsets among the layer's stored rows; cu: (L, H+1) int32 the merged offsets;
    dest: (K,) int64 each stored row's merged row, within its layer; first: (L, H*s) int64
    each prefix row's merged row; scores/positions: (R,) float32 / int32 of the merged rows
    of all layers, layer after layer; starts / stored: where each layer's merged / stored
    rows begin (L+1 host ints each).
    """

    lens: list[list[int]]
    ctx_cu: torch.Tensor
    cu: torch.Tensor
    dest: torch.Tensor
    first: torch.Tensor
    scores: torch.Tensor
    positions: torch.Tensor
    starts: list[int]
    stored: list[int]

    def context_bounds(self, layer: int) -> list[int]:
        """The stored row offsets of `layer` as host ints."""
        return [0, *accumulate(self.lens[layer])]


def plan_merge(
    kept: torch.Tensor, lens: list[list[int]], s: int, scores: Sequence[torch.Tensor]
) -> MergePlan:
    """The MergePlan of layers with kept masks (L, H, n) bool, whose heads keep `lens`
    (`unpack_layers`) context rows, behind s prefix rows each, and the stored scores (K_l,)
    of each layer; nothing here waits for the device (every size is a host int)."""
    n_layers, h, _ = kept.shape
    rows = [sum(x) for x in lens]
    for i, (got, want) in enumerate(zip(scores, rows, strict=True)):
        if tuple(got.shape) != (want,):
            raise CorruptContextError(
                f"stored context layer {i}: scores {tuple(got.shape)} do not fit {want} kept rows"
            )
    starts = [0, *accumulate(r + h * s for r in rows)]
    stored = [0, *accumulate(rows)]
    ctx_cu = [[0, *accumulate(x)] for x in lens]
    cu = [[c + s * j for j, c in enumerate(row)] for row in ctx_cu]
    offsets = torch.tensor([ctx_cu, cu], dtype=torch.int32).view(2, n_layers, h + 1)
    dest, first, where = _destinations(lens, s, starts, stored, cu, kept.device)
    merged_scores = torch.full((starts[-1],), torch.inf, dtype=torch.float32, device=kept.device)
    if scores:
        merged_scores.index_copy_(
            0, where[0], torch.cat([x.to(kept.device).float() for x in scores])
        )
    positions = torch.empty(starts[-1], dtype=torch.int32, device=kept.device)
    in_prefix = torch.arange(s, device=kept.device, dtype=torch.int32).repeat(n_layers * h)
    positions.index_copy_(0, where[1], in_prefix)
    positions.index_copy_(0, where[0], _kept_positions(kept, stored[-1]) + s)
    offsets = offsets.to(kept.device, non_blocking=True)
    return MergePlan(
        lens, offsets[0], offsets[1], dest, first, merged_scores, positions, starts, stored
    )


def _destinations(
    lens: list[list[int]],
    s: int,
    starts: list[int],
    stored: list[int],
    cu: list[list[int]],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(dest (K,), first (L, H*s): merged rows within each layer, of the stored rows and the
    prefix rows; the same two across all layers, (K,) and (L*H*s,)), from one small table per
    (layer, head) copied to the device."""
    pairs = [(i, j) for i in range(len(lens)) for j in range(len(lens[i]))]
    table = torch.tensor(
        [
            [lens[i][j] for i, j in pairs],  # the head's stored rows
            [s * (j + 1) - stored[i] for i, j in pairs],  # stored row -> merged, in the layer
            [starts[i] for i, j in pairs],  # the layer's first merged row among all
            [cu[i][j] for i, j in pairs],  # the head's first merged row, in the layer
        ],
        dtype=torch.int64,
    ).to(device, non_blocking=True)
    pair = torch.repeat_interleave(
        torch.arange(len(pairs), device=device), table[0], output_size=stored[-1]
    )
    dest = torch.arange(stored[-1], device=device) + table[1][pair]
    first = table[3][:, None] + torch.arange(s, device=device)  # (L*H, s)
    every = (dest + table[2][pair], (first + table[2][:, None]).flatten())
    heads = len(lens[0]) if lens else 0
    return dest, first.view(len(lens), heads * s), every


def merged_layer(
    plan: MergePlan, i: int, prefix: RaggedLayer | None, keys: torch.Tensor, values: torch.Tensor
) -> RaggedLayer:
    """Layer i whole: per head, the prefix's rows (all kept; None when s = 0) then its kept
    context rows (keys/values (K_i, d) in stored order, on the plan's device)."""
    a, b = plan.starts[i], plan.starts[i + 1]
    where = plan.dest[plan.stored[i] : plan.stored[i + 1]]
    prefix_rows = plan.first.shape[1]
    if (prefix is None and prefix_rows) or (
        prefix is not None and prefix.keys.shape != (prefix_rows, keys.shape[1])
    ):
        raise ValueError("the prefix does not have the layer's heads and channels")
    out = []
    for part, field in ((keys, "keys"), (values, "values")):
        whole = part.new_empty(b - a, part.shape[1]).index_copy_(0, where, part)
        if prefix is not None:
            whole.index_copy_(0, plan.first[i], getattr(prefix, field).to(part.device, part.dtype))
        out.append(whole)
    return RaggedLayer(out[0], out[1], plan.cu[i], plan.scores[a:b], plan.positions[a:b])


def _kept_positions(kept: torch.Tensor, rows: int) -> torch.Tensor:
    """(..., n) bool with `rows` set -> (rows,) int32 token index of each, in row-major
    order (kept.nonzero()'s last column, without the synchronisation nonzero needs)."""
    flat = kept.flatten()
    n = kept.shape[-1]
    at = torch.where(flat, flat.cumsum(0) - 1, rows)  # the unkept all land in slot `rows`
    out = torch.empty(rows + 1, dtype=torch.int32, device=kept.device)
    token = torch.arange(flat.numel(), device=kept.device, dtype=torch.int32) % max(n, 1)
    return out.scatter_(0, at, token)[:rows]
