"""The version 3 row layout: prefix rows left out, kept tokens as bits, put back exactly."""

from __future__ import annotations

import pytest
import torch

from service.engine import shared_prefix
from service.engine.kvcache import RaggedLayer
from service.errors import CorruptContextError

S, N, D = 4, 19, 8  # prefix tokens, context tokens, channels


def _layer(kept: list[list[int]], seed: int = 0) -> RaggedLayer:
    """Heads holding the prefix then the context tokens `kept[h]` (ascending)."""
    g = torch.Generator().manual_seed(seed)
    positions = [list(range(S)) + [S + t for t in head] for head in kept]
    lens = [len(p) for p in positions]
    n = sum(lens)
    scores = torch.rand(n, generator=g)
    flat = torch.tensor([p for head in positions for p in head], dtype=torch.int32)
    scores[flat < S] = torch.inf
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    keys, values = torch.randn(2, n, D, generator=g)
    return RaggedLayer(keys, values, cu, scores, flat)


KEPT = [[0, 3, 4, 18], [], list(range(N))]


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """One layer's mask through `unpack_layers`: (H, n) bool."""
    return shared_prefix.unpack_layers([packed], n)[0][0]


def merge(
    prefix: RaggedLayer | None,
    kept: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
) -> RaggedLayer:
    """One layer whole through `plan_merge` + `merged_layer`, as decode does it."""
    h = kept.shape[0]
    s = 0 if prefix is None else prefix.keys.shape[0] // max(h, 1)
    plan = shared_prefix.plan_merge(kept[None], [kept.sum(1).tolist()], s, [scores])
    return shared_prefix.merged_layer(plan, 0, prefix, keys, values)


def test_split_then_merge_gives_the_layer_back_exactly() -> None:
    layer = _layer(KEPT)
    rest, packed = shared_prefix.split(layer, S, N)
    assert packed.shape == (3, 3) and packed.dtype == torch.uint8
    assert rest.keys.shape == (sum(map(len, KEPT)), D)
    assert bool((rest.positions >= S).all())
    prefix = layer.keep(layer.positions < S)
    kept = unpack_bits(packed, N)
    assert kept.sum(1).tolist() == [len(k) for k in KEPT]
    back = merge(prefix, kept, rest.keys, rest.values, rest.scores)
    for field in ("keys", "values", "cu_lens", "scores", "positions"):
        assert torch.equal(getattr(back, field), getattr(layer, field)), field


def test_without_a_prefix_the_context_rows_are_the_layer() -> None:
    kept = torch.zeros(2, 5, dtype=torch.bool)
    kept[0, [1, 4]] = kept[1, 2] = True
    keys, values = torch.randn(2, 3, D)
    layer = merge(None, kept, keys, values, torch.rand(3))
    assert layer.cu_lens.tolist() == [0, 2, 3] and layer.positions.tolist() == [1, 4, 2]
    assert torch.equal(layer.keys, keys)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64])
def test_bits_round_trip(n: int) -> None:
    mask = torch.rand(3, n, generator=torch.Generator().manual_seed(n)) < 0.4
    packed = shared_prefix.pack_bits(mask)
    assert packed.shape == (3, -(-n // 8))
    assert torch.equal(unpack_bits(packed, n), mask)


def test_a_layer_without_the_whole_prefix_or_out_of_order_is_refused() -> None:
    layer = _layer(KEPT)
    no_prefix = layer.keep(layer.positions != 2)
    with pytest.raises(ValueError, match="whole prefix"):
        shared_prefix.split(no_prefix, S, N)
    swapped = layer.positions.clone()
    swapped[[5, 6]] = swapped[[6, 5]]
    with pytest.raises(ValueError, match="position order"):
        shared_prefix.split(
            RaggedLayer(layer.keys, layer.values, layer.cu_lens, layer.scores, swapped), S, N
        )
    with pytest.raises(ValueError, match="outside the context"):
        shared_prefix.split(layer, S, N - 1)


def test_a_mask_of_another_width_is_refused() -> None:
    packed = shared_prefix.pack_bits(torch.ones(2, 12, dtype=torch.bool))
    assert unpack_bits(packed, 12).all()
    with pytest.raises(CorruptContextError, match="does not fit"):
        unpack_bits(packed, 17)
    with pytest.raises(CorruptContextError, match="past the context"):
        unpack_bits(packed, 10)


def _random_kept(seed: int, heads: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    rate = [0.0, 0.3, 1.0, 0.6][seed % 4]  # an empty layer, a full one, ragged ones
    return [[t for t in range(N) if float(torch.rand(1, generator=g)) < rate] for _ in range(heads)]


@pytest.mark.parametrize("seed", range(6))
def test_merging_from_the_host_row_counts_gives_the_layer_back(seed: int) -> None:
    """plan_merge + merged_layer (as decode uses them: every layer planned at once, with no
    device sync) put every field of every layer back exactly, whatever the heads keep
    (none, all, some)."""
    layers = [_layer(_random_kept(seed + i), seed + i) for i in range(3)]
    splits = [shared_prefix.split(layer, S, N) for layer in layers]
    kept, lens = shared_prefix.unpack_layers([packed for _, packed in splits], N)
    assert lens == [[len(k) for k in _random_kept(seed + i)] for i in range(3)]
    plan = shared_prefix.plan_merge(kept, lens, S, [rest.scores for rest, _ in splits])
    for i, (layer, (rest, _)) in enumerate(zip(layers, splits, strict=True)):
        prefix = layer.keep(layer.positions < S)
        back = shared_prefix.merged_layer(plan, i, prefix, rest.keys, rest.values)
        for field in ("keys", "values", "cu_lens", "scores", "positions"):
            assert torch.equal(getattr(back, field), getattr(layer, field)), (i, field)


def test_all_layers_masks_are_checked_together() -> None:
    """unpack_layers: the masks and row counts of every layer; a padding bit set in any
    layer, or layers of different shapes, are refused."""
    masks = [torch.rand(3, 12, generator=torch.Generator().manual_seed(i)) < 0.5 for i in range(3)]
    got, lens = shared_prefix.unpack_layers([shared_prefix.pack_bits(m) for m in masks], 12)
    assert torch.equal(got, torch.stack(masks))
    assert lens == [m.sum(1).tolist() for m in masks]
    bad = [shared_prefix.pack_bits(m) for m in masks]
    bad[1] = bad[1].clone()
    bad[1][2, 1] |= 1 << 5  # token 13 of a 12-token context
    with pytest.raises(CorruptContextError, match="past the context"):
        shared_prefix.unpack_layers(bad, 12)
    with pytest.raises(CorruptContextError, match="differ between layers"):
        shared_prefix.unpack_layers([bad[0], bad[0][:2]], 12)
    assert shared_prefix.unpack_layers([], 12)[1] == []


def test_scores_that_do_not_fit_the_kept_rows_are_refused() -> None:
    layer = _layer(KEPT)
    rest, packed = shared_prefix.split(layer, S, N)
    kept, lens = shared_prefix.unpack_layers([packed], N)
    with pytest.raises(CorruptContextError, match="scores"):
        shared_prefix.plan_merge(kept, lens, S, [rest.scores[:-1]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merging_on_the_gpu_matches_the_cpu() -> None:
    layers = [_layer(_random_kept(i), i) for i in range(1, 4)]
    splits = [shared_prefix.split(layer, S, N) for layer in layers]
    kept, lens = shared_prefix.unpack_layers([p.cuda() for _, p in splits], N)
    plan = shared_prefix.plan_merge(kept, lens, S, [rest.scores.cuda() for rest, _ in splits])
    for i, (layer, (rest, _)) in enumerate(zip(layers, splits, strict=True)):
        prefix = layer.keep(layer.positions < S)
        back = shared_prefix.merged_layer(plan, i, prefix, rest.keys.cuda(), rest.values.cuda())
        for field in ("keys", "values", "cu_lens", "scores", "positions"):
            assert torch.equal(getattr(back, field).cpu(), getattr(layer, field)), field
