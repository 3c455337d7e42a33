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


def unpack_layers(
    packed: Sequence[torch.Tensor], n: int
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Every layer's kept mask (`pack_bits` layout) -> (the masks (H, n) bool, per layer
    the kept rows of each head as host ints), checked with one device synchronisation for
    all layers (not one per layer). CorruptContextError for a wrong size or a set padding
    bit."""
    masks, counts = [], []
    for bits in packed:
        if bits.dtype != torch.uint8 or bits.ndim != 2 or bits.shape[1] != -(-n // 8):
            raise CorruptContextError(
                f"stored kept mask {tuple(bits.shape)} {bits.dtype} does not fit {n} tokens"
            )
        mask = ((bits[..., None] >> _BITS.to(bits.device)) & 1).view(bits.shape[0], -1).bool()
        masks.append(mask[:, :n])
        counts.append(torch.cat([mask[:, :n].sum(1), mask[:, n:].sum().view(1)]))
    flat = torch.cat(counts).tolist() if counts else []
    lens, at = [], 0
    for mask in masks:
        h = mask.shape[0]
        if flat[at + h]:
            raise CorruptContextError("stored kept mask marks tokens past the context")
        lens.append(flat[at : at + h])
        at += h + 1
    return masks, lens


def context_cu_lens(kept: torch.Tensor) -> torch.Tensor:
    """(H+1,) int32 row offsets of the context rows a kept mask (H, n) describes."""
    cu = torch.zeros(kept.shape[0] + 1, dtype=torch.int32, device=kept.device)
    cu[1:] = kept.sum(1).cumsum(0)
    return cu


def merge(
    prefix: RaggedLayer | None,
    kept: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    lens: Sequence[int] | None = None,
) -> RaggedLayer:
    """The whole layer: per head, the prefix's rows (all kept; None: no prefix) then the
    kept context rows (keys/values (N', d) head-major, scores (N',)), on `keys`' device.

    kept: (H, n) bool; lens: its row sums as host ints (`unpack_layers`), which spares the
    device synchronisation that finding them costs; every size then being known, nothing
    here waits for the device.
    """
    h, device = kept.shape[0], keys.device
    lens = kept.sum(1).tolist() if lens is None else lens
    s = 0 if prefix is None else prefix.keys.shape[0] // max(h, 1)
    if prefix is not None and (prefix.n_heads != h or prefix.keys.shape != (h * s, keys.shape[1])):
        raise ValueError("the prefix does not have the layer's heads and channels")
    kept = kept.to(device)
    rows, total = sum(lens), sum(lens) + h * s
    cu = torch.zeros(h + 1, dtype=torch.int64, device=device)
    cu[1:] = kept.sum(1).cumsum(0) + s * torch.arange(1, h + 1, device=device)  # merged rows
    heads = torch.arange(h, device=device)
    context = torch.arange(rows, device=device) + s * (
        torch.repeat_interleave(heads, kept.sum(1), output_size=rows) + 1
    )  # (N',) where each context row goes
    first = (cu[:-1, None] + torch.arange(s, device=device)).flatten()  # (H*s,) prefix rows
    out = []
    for part, field in ((keys, "keys"), (values, "values")):
        whole = part.new_empty(total, part.shape[1]).index_copy_(0, context, part)
        if prefix is not None:
            whole.index_copy_(0, first, getattr(prefix, field).to(device, part.dtype))
        out.append(whole)
    score = torch.full((total,), torch.inf, dtype=torch.float32, device=device)
    score.index_copy_(0, context, scores.to(device=device, dtype=torch.float32))
    positions = torch.empty(total, dtype=torch.int32, device=device)
    positions.index_copy_(0, first, torch.arange(s, device=device, dtype=torch.int32).repeat(h))
    positions.index_copy_(0, context, _kept_positions(kept, rows) + s)
    return RaggedLayer(out[0], out[1], cu.to(torch.int32), score, positions)


def _kept_positions(kept: torch.Tensor, rows: int) -> torch.Tensor:
    """(H, n) bool with `rows` set -> (rows,) int32 token index of each, head-major and
    ascending (kept.nonzero()'s columns, without the synchronisation nonzero needs)."""
    flat = kept.flatten()
    n = kept.shape[1]
    at = torch.where(flat, flat.cumsum(0) - 1, rows)  # the unkept all land in slot `rows`
    out = torch.empty(rows + 1, dtype=torch.int32, device=kept.device)
    token = torch.arange(flat.numel(), device=kept.device, dtype=torch.int32) % max(n, 1)
    return out.scatter_(0, at, token)[:rows]
