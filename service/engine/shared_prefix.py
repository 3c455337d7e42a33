"""The rows a version 3 (quantized) object stores: the context's, with kept tokens as bits.

Every head of every layer of a context holds the prefix rows first (the chat template
before the document, positions 0..s-1, score +inf, always kept). They are the same for
every context of one model and system prompt, and at ratio 0.3 of a 1.4K-token document
they are 8% of the stored rows, so a version 3 object leaves them out: `split` drops them
before quantization and `merge` puts back the engine's own, unquantized ones when loading
(`KVzipEngine.prefix_context`, one short prefill per prefix and process).

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


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """`pack_bits`' inverse: (H, n) bool; CorruptContextError for a wrong size or a set
    padding bit."""
    return unpack_layers([packed], n)[0][0]


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
    rows per head, K context rows in all.

    lens: per layer, each head's context rows (host ints); ctx_cu: (L, H+1) int32 their row
    offsets in the stored (context-only) rows; cu: (L, H+1) int32 the merged offsets;
    dest: (K,) int64 each stored row's merged row, within its layer; first: (L, H*s) int64
    each prefix row's merged row; scores/positions: (R,) float32 / int32 of the merged rows of
    all layers, layer after layer (`starts`: where each layer's begin, L+1 host ints).
    """

    lens: list[list[int]]
    ctx_cu: torch.Tensor
    cu: torch.Tensor
    dest: torch.Tensor
    first: torch.Tensor
    scores: torch.Tensor
    positions: torch.Tensor
    starts: list[int]

    def context_bounds(self, layer: int) -> list[int]:
        """The stored row offsets of `layer` as host ints."""
        return [0, *accumulate(self.lens[layer])]


def plan_merge(
    kept: torch.Tensor, lens: list[list[int]], s: int, scores: Sequence[torch.Tensor]
) -> MergePlan:
    """The MergePlan of layers with kept masks (L, H, n) bool, whose heads keep `lens`
    (`unpack_layers`) context rows, behind s prefix rows each, and the stored scores (K_l,)
    of each layer; nothing here waits for the device (every size is a host int)."""
    n_layers, h, n = kept.shape
    device = kept.device
    rows = [sum(x) for x in lens]
    for i, (got, want) in enumerate(zip(scores, rows, strict=True)):
        if tuple(got.shape) != (want,):
            raise CorruptContextError(
                f"stored context layer {i}: scores {tuple(got.shape)} do not fit {want} kept rows"
            )
    starts = [0, *accumulate(r + h * s for r in rows)]
    ctx_cu = [[0, *accumulate(x)] for x in lens]
    cu = [[c + s * j for j, c in enumerate(row)] for row in ctx_cu]
    ctx_start = [0, *accumulate(rows)]
    pairs = [(i, j) for i in range(n_layers) for j in range(h)]
    table = torch.tensor(
        [
            [lens[i][j] for i, j in pairs],
            [s * (j + 1) - ctx_start[i] for i, j in pairs],  # stored row -> merged, in the layer
            [starts[i] for i, j in pairs],
            [cu[i][j] for i, j in pairs],  # a head's first merged row
        ],
        dtype=torch.int64,
    ).to(device, non_blocking=True)
    pair = torch.repeat_interleave(
        torch.arange(len(pairs), device=device), table[0], output_size=ctx_start[-1]
    )
    dest = torch.arange(ctx_start[-1], device=device) + table[1][pair]
    first = (table[3][:, None] + torch.arange(s, device=device)).view(n_layers, h * s)
    merged = dest + table[2][pair]  # across layers
    every_first = (first + table[2].view(n_layers, h)[:, :1]).flatten()
    score = torch.full((starts[-1],), torch.inf, dtype=torch.float32, device=device)
    if scores:
        score.index_copy_(0, merged, torch.cat([x.to(device, torch.float32) for x in scores]))
    positions = torch.empty(starts[-1], dtype=torch.int32, device=device)
    prefix_positions = torch.arange(s, device=device, dtype=torch.int32).repeat(len(pairs))
    positions.index_copy_(0, every_first, prefix_positions)
    positions.index_copy_(0, merged, _kept_positions(kept, ctx_start[-1]) + s)
    offsets = torch.tensor([ctx_cu, cu], dtype=torch.int32).view(2, n_layers, h + 1)
    offsets = offsets.to(device, non_blocking=True)
    return MergePlan(
        lens,
        offsets[0],
        offsets[1],
        dest,
        first,
        score,
        positions,
        starts,
    )


def merged_layer(
    plan: MergePlan, i: int, prefix: RaggedLayer | None, keys: torch.Tensor, values: torch.Tensor
) -> RaggedLayer:
    """Layer i whole: per head, the prefix's rows (all kept; None when s = 0) then its kept
    context rows (keys/values (K_i, d) in stored order, on the plan's device)."""
    a, b = plan.starts[i], plan.starts[i + 1]
    at = sum(map(sum, plan.lens[:i]))
    where = plan.dest[at : at + keys.shape[0]]
    s = plan.first.shape[1] // max(len(plan.lens[i]), 1)
    if (prefix is None and s) or (
        prefix is not None and prefix.keys.shape != (plan.first.shape[1], keys.shape[1])
    ):
        raise ValueError("the prefix does not have the layer's heads and channels")
    out = []
    for part, field in ((keys, "keys"), (values, "values")):
        whole = part.new_empty(b - a, part.shape[1]).index_copy_(0, where, part)
        if prefix is not None:
            whole.index_copy_(0, plan.first[i], getattr(prefix, field).to(part.device, part.dtype))
        out.append(whole)
    return RaggedLayer(out[0], out[1], plan.cu[i], plan.scores[a:b], plan.positions[a:b])


def merge(
    prefix: RaggedLayer | None,
    kept: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
) -> RaggedLayer:
    """One layer whole (`plan_merge` + `merged_layer`): per head, the prefix's rows (all
    kept; None: no prefix) then the kept context rows (kept (H, n) bool; keys/values (N', d)
    head-major, scores (N',)), on `keys`' device."""
    h = kept.shape[0]
    s = 0 if prefix is None else prefix.keys.shape[0] // max(h, 1)
    if prefix is not None and prefix.n_heads != h:
        raise ValueError("the prefix does not have the layer's heads and channels")
    kept = kept.to(keys.device)
    plan = plan_merge(kept[None], [kept.sum(1).tolist()], s, [scores])
    return merged_layer(plan, 0, prefix, keys, values)


def _kept_positions(kept: torch.Tensor, rows: int) -> torch.Tensor:
    """(..., n) bool with `rows` set -> (rows,) int32 token index of each, in row-major
    order (kept.nonzero()'s last column, without the synchronisation nonzero needs)."""
    flat = kept.flatten()
    n = kept.shape[-1]
    at = torch.where(flat, flat.cumsum(0) - 1, rows)  # the unkept all land in slot `rows`
    out = torch.empty(rows + 1, dtype=torch.int32, device=kept.device)
    token = torch.arange(flat.numel(), device=kept.device, dtype=torch.int32) % max(n, 1)
    return out.scatter_(0, at, token)[:rows]
