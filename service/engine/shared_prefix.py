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
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != -(-n // 8):
        raise CorruptContextError(
            f"stored kept mask {tuple(packed.shape)} {packed.dtype} does not fit {n} tokens"
        )
    bits = (packed[..., None] >> _BITS.to(packed.device)) & 1
    mask = bits.view(packed.shape[0], -1).bool()
    if bool(mask[:, n:].any()):
        raise CorruptContextError("stored kept mask marks tokens past the context")
    return mask[:, :n]


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
) -> RaggedLayer:
    """The whole layer: per head, the prefix's rows (all kept; None: no prefix) then the
    kept context rows (keys/values (N', d) head-major, scores (N',)), on `keys`' device."""
    h, device = kept.shape[0], keys.device
    if prefix is None:
        prefix = RaggedLayer.from_dense(
            *(keys.new_empty(h, 0, keys.shape[1]),) * 2, keys.new_empty(h, 0)
        )
    s = prefix.keys.shape[0] // max(h, 1)
    if prefix.n_heads != h or prefix.keys.shape != (h * s, keys.shape[1]):
        raise ValueError("the prefix does not have the layer's heads and channels")
    full = torch.cat([torch.ones(h, s, dtype=torch.bool, device=device), kept.to(device)], 1)
    _, positions = full.nonzero(as_tuple=True)  # head-major, positions ascending
    context = (positions >= s).nonzero().squeeze(1)
    first = (positions < s).nonzero().squeeze(1)
    out = []
    for rows, front in ((keys, prefix.keys), (values, prefix.values)):
        whole = rows.new_empty(positions.numel(), rows.shape[1])
        whole[first] = front.to(device=device, dtype=rows.dtype)
        whole[context] = rows
        out.append(whole)
    score = torch.full((positions.numel(),), torch.inf, dtype=torch.float32, device=device)
    score[context] = scores.to(device=device, dtype=torch.float32)
    cu = torch.zeros(h + 1, dtype=torch.int32, device=device)
    cu[1:] = full.sum(1).cumsum(0)
    return RaggedLayer(out[0], out[1], cu, score, positions.to(torch.int32))
