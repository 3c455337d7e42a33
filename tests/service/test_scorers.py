"""Every scoring method against an independent dense reference on the tiny model.

The reference is a second copy of the model whose attention records post-RoPE queries,
keys, values and the attention input of every layer during ONE plain forward over
prefix + context (+ x_k); softmaxes are then formed explicitly over index sets in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM

from service.compression.scorers import SCORERS, build_scorer
from service.compression.scorers.kvzip_head import (
    calibrate,
    head_scores_path,
    load_head_scores,
    save_head_scores,
)
from service.compression.selection import select
from service.config import METHODS, CompressionConfig
from service.engine.prompt import build_layout
from service.errors import InvalidInputError
from tests.service.kvzap_testing import store_test_predictor

TEXT = (
    "The harbour master counted the boats at dawn. Seven fishing boats left before the "
    "storm, and two ferries stayed at the pier until noon. "
) * 3
CALIBRATION = "A quiet village sat by the river; its mill ground wheat for three towns. " * 5


class Recorder:
    """A fresh copy of the tiny model that records q, k, v (B=1 squeezed) and ||x_t||."""

    def __init__(self, model_dir) -> None:
        self.store: dict[int, dict[str, torch.Tensor]] = {}

        def attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
            self.store.setdefault(module.layer_idx, {}).update(q=q[0], k=k[0], v=v[0])
            group = q.shape[1] // k.shape[1]
            out = F.scaled_dot_product_attention(
                q,
                k.repeat_interleave(group, 1),
                v.repeat_interleave(group, 1),
                is_causal=True,
                scale=scaling,
            )
            return out.transpose(1, 2), None

        AttentionInterface.register("test_scorers_record", attention)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation="test_scorers_record"
        ).eval()
        for layer in self.model.model.layers:
            attn = layer.self_attn
            attn.register_forward_pre_hook(self._hook(attn.layer_idx), with_kwargs=True)

    def _hook(self, idx):
        def record(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            self.store.setdefault(idx, {})["xnorm"] = x[0].double().norm(dim=-1)

        return record

    def run(self, ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        with torch.no_grad():
            self.model(torch.tensor([ids]))
        return {i: {k: t.clone() for k, t in d.items()} for i, d in self.store.items()}


@pytest.fixture(scope="module")
def recorder(tiny_model_dir):
    return Recorder(tiny_model_dir)


@pytest.fixture(scope="module")
def doc(tiny_engine):
    return tiny_engine.encode_document(TEXT)


def _full(engine, doc, m=2000):
    return engine.prefill_context(doc, CompressionConfig("kvzip", 1.0, m))


def _ours(engine, doc, method, m=2000):
    scored = engine.score(_full(engine, doc, m), method=method)
    s = scored.prefix_len
    return [layer.scores.view(layer.n_heads, -1)[:, s:].double() for layer in scored.layers]


def _probs(q, k, rows, keys, scale):
    """Explicit causal softmax restricted to `keys`: q (Hq, N, d), k (H, N, d) -> (Hq, R, K)."""
    hq, h = q.shape[0], k.shape[0]
    kk = k.double().repeat_interleave(hq // h, 0)[:, keys]
    logits = torch.einsum("jtd,jkd->jtk", q.double()[:, rows], kk) * scale
    visible = torch.tensor(keys).unsqueeze(0) <= torch.tensor(rows).unsqueeze(1)
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


# --- one test matrix over every method ------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tiny_engine, tmp_path_factory):
    """The tiny engine with head scores and a kvzap predictor (beside them) in its paths."""
    engine = tiny_engine.with_config(
        head_scores_dir=tmp_path_factory.mktemp("calibrations") / "head_scores"
    )
    save_head_scores(
        engine.config.head_scores_dir,
        engine.identity,
        calibrate(engine, [CALIBRATION], chunk_size=64),
    )
    store_test_predictor(engine)  # kvzap: a predictor beside the head scores
    return engine


def test_every_method_has_a_scorer():
    assert set(METHODS) == set(SCORERS) | {"none"}


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_method_matrix(calibrated, doc, method):
    """Exact budget, protected prefix, shape, and query-time re-selection == direct."""
    scored = calibrated.score(_full(calibrated, doc, 64), method=method)
    s, n = scored.prefix_len, scored.context_len
    for layer in scored.layers:
        sc = layer.scores.view(layer.n_heads, -1)
        assert sc.shape[1] == s + n and torch.isinf(sc[:, :s]).all()
        assert torch.isfinite(sc[:, s:]).all() and (sc[:, s:] >= 0).all()
    for ratio in (0.1, 0.3):
        out = select(scored, ratio)
        assert out.kept_pairs == math.floor(ratio * scored.total_pairs + 1e-9)
    direct, via = select(scored, 0.2), select(select(scored, 0.3), 0.2)
    for a, b in zip(direct.layers, via.layers, strict=True):
        assert torch.equal(a.cu_lens, b.cu_lens) and torch.equal(a.positions, b.positions)


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_ingest_dispatches_by_method(calibrated, doc, method):
    passes = calibrated.reconstruction_passes
    calibrated.check_method(method)  # calibrated: every method can run
    ctx, timings = calibrated.ingest(doc, CompressionConfig(method, 0.3, 64))
    assert ctx.method == method and ctx.ratio == 0.3
    assert ctx.kept_pairs == math.floor(0.3 * ctx.total_pairs + 1e-9)
    uses_reconstruction = method in ("kvzip", "kvzip_plus")
    assert (calibrated.reconstruction_passes > passes) == uses_reconstruction
    assert min(timings.prefill_s, timings.scoring_s, timings.selection_s) >= 0


def test_unknown_method_is_refused():
    with pytest.raises(InvalidInputError, match="no scorer"):
        build_scorer("magic")


# --- references -----------------------------------------------------------------------------


def test_kvzip_plus_matches_dense_reference(tiny_engine, doc, recorder):
    m = 40
    ours = _ours(tiny_engine, doc, "kvzip_plus", m)
    layout = build_layout(tiny_engine.tokenizer)
    ids, s = doc.all_ids, len(doc.prefix_ids)
    n = len(doc.context_ids)
    assert n > 2 * m
    for a in range(0, n, m):
        b = min(a + m, n)
        x = layout.reconstruction_ids(ids[s + a : s + b], ids[s + a - m : s + a] if a else None)
        rec = recorder.run(ids + x)
        rows = list(range(s + n, s + n + len(x)))
        keys = list(range(s)) + list(range(s + a, s + b)) + rows
        for layer_idx, got in enumerate(ours):
            r = rec[layer_idx]
            q, k, v, xnorm = r["q"], r["k"], r["v"], r["xnorm"]
            hq, h, d = q.shape[0], k.shape[0], q.shape[-1]
            p = _probs(q, k, rows, keys, d**-0.5)[:, :, s : s + (b - a)]  # (Hq, T, m)
            w_o = recorder.model.model.layers[layer_idx].self_attn.o_proj.weight.double()
            vv = v.double().repeat_interleave(hq // h, 0)[:, s + a : s + b]  # (Hq, m, d)
            won = torch.stack(
                [(vv[j] @ w_o[:, j * d : (j + 1) * d].T).norm(dim=-1) for j in range(hq)]
            )  # (Hq, m)
            weighted = p * won.unsqueeze(1) / xnorm[rows].view(1, -1, 1)
            weighted[:, xnorm[rows] == 0] = 0.0  # a zero attention input carries no signal
            oracle = weighted.amax(dim=1).view(h, hq // h, -1).amax(dim=1)
            torch.testing.assert_close(got[:, a:b], oracle, atol=1e-6, rtol=2e-3)


def test_h2o_accumulated_attention_matches_dense_reference(tiny_engine, doc, recorder):
    from service.compression.scorers.h2o import accumulated_attention

    full = _full(tiny_engine, doc)
    ours = accumulated_attention(tiny_engine, full)
    s, n = len(doc.prefix_ids), len(doc.context_ids)
    rec = recorder.run(doc.all_ids)
    rows = list(range(s, s + n))
    for layer_idx, got in enumerate(ours):
        q, k = rec[layer_idx]["q"], rec[layer_idx]["k"]
        h, hq = k.shape[0], q.shape[0]
        p = _probs(q, k, rows, list(range(s + n)), q.shape[-1] ** -0.5)[:, :, s:]
        oracle = p.sum(dim=1).view(h, hq // h, n).sum(dim=1)
        torch.testing.assert_close(got.double(), oracle, atol=1e-5, rtol=1e-4)


def test_h2o_scores_rank_heavy_hitters_and_recent_tokens_alike():
    """Brute force: score = 1 - min(recency rank, heaviness rank) / n, ties by position."""
    from service.compression.scorers.h2o import heavy_recent_scores

    gen = torch.Generator().manual_seed(3)
    mass = torch.randint(0, 6, (3, 40), generator=gen).float()  # many ties
    got = heavy_recent_scores(mass)
    h, n = mass.shape
    for head in range(h):
        for i in range(n):
            heavier = sum(
                1 for j in range(n) if mass[head, j] > mass[head, i] or (
                    mass[head, j] == mass[head, i] and j < i
                )
            )  # fmt: skip
            assert abs(float(got[head, i]) - (1.0 - min(heavier, n - 1 - i) / n)) < 1e-6


def test_h2o_keeps_the_recent_window_and_the_heavy_hitters(tiny_engine, doc):
    """Every head: its j most recent and j heaviest pairs, j the same in every head (+-1)."""
    from service.compression.scorers.h2o import accumulated_attention, heavy_recent_scores

    full = _full(tiny_engine, doc)
    masses = accumulated_attention(tiny_engine, full)
    ctx = select(tiny_engine.score(full, method="h2o"), 0.3)
    s, n = ctx.prefix_len, ctx.context_len
    levels = []
    for layer, mass in zip(ctx.layers, masses, strict=True):
        rank = ((1.0 - heavy_recent_scores(mass)) * n).round().long()  # min of the two ranks
        for h in range(layer.n_heads):
            kept = torch.zeros(n, dtype=torch.bool)
            kept[layer.positions[layer.head(h)][s:].long() - s] = True
            assert kept[n - 1] and kept[int(mass[h].argmax())]  # newest and heaviest
            levels.append((int(rank[h][~kept].min()), int(rank[h][kept].max())))
    assert max(lo for lo, _ in levels) - min(lo for lo, _ in levels) <= 1
    assert all(hi <= lo for lo, hi in levels)  # kept = every pair below a level


def _snapkv_reference_votes(recorder, doc) -> list[torch.Tensor]:
    """SnapKV's votes from the paper's definition, float64: per KV head, the summed
    attention of the last WINDOW context queries (and the G query heads of its group) on
    each earlier context key, the softmax over every key; average-pooled over POOL keys
    with zero padding counted (an explicit loop). Per layer (H, n - WINDOW)."""
    from service.compression.scorers.snapkv import POOL, WINDOW

    s, n = len(doc.prefix_ids), len(doc.context_ids)
    rec = recorder.run(doc.all_ids)
    rows = list(range(s + n - WINDOW, s + n))
    out = []
    for layer_idx in sorted(rec):
        q, k = rec[layer_idx]["q"], rec[layer_idx]["k"]
        h, hq = k.shape[0], q.shape[0]
        p = _probs(q, k, rows, list(range(s + n)), q.shape[-1] ** -0.5)[:, :, s : s + n - WINDOW]
        votes = p.sum(dim=1).view(h, hq // h, n - WINDOW).sum(dim=1) / (WINDOW * hq // h)
        half = POOL // 2
        out.append(
            torch.stack(
                [
                    torch.stack(
                        [row[max(0, i - half) : i + half + 1].sum() / POOL for i in range(len(row))]
                    )
                    for row in votes
                ]
            )
        )
    return out


def test_snapkv_votes_match_dense_reference(tiny_engine, doc, recorder):
    from service.compression.scorers.snapkv import WINDOW, SnapKVScorer

    n = len(doc.context_ids)
    ours = _ours(tiny_engine, doc, SnapKVScorer(per_head=False))
    for got, want in zip(ours, _snapkv_reference_votes(recorder, doc), strict=True):
        torch.testing.assert_close(got[:, : n - WINDOW], want, atol=1e-7, rtol=1e-4)
        assert torch.equal(got[:, n - WINDOW :], torch.ones(got.shape[0], WINDOW).double())


@pytest.mark.parametrize("ratio", [0.6, 0.45])
def test_snapkv_keeps_window_and_top_votes_per_head(tiny_engine, doc, recorder, ratio):
    """As published: EVERY head keeps the same number of pairs (one level, +-1), the whole
    observation window, then its largest reference votes (near-ties allowed)."""
    from service.compression.scorers.snapkv import WINDOW

    ctx = select(tiny_engine.score(_full(tiny_engine, doc), method="snapkv"), ratio)
    s, n = ctx.prefix_len, ctx.context_len
    counts = []
    for layer, votes in zip(ctx.layers, _snapkv_reference_votes(recorder, doc), strict=True):
        for h in range(layer.n_heads):
            kept = torch.zeros(n, dtype=torch.bool)
            kept[layer.positions[layer.head(h)][s:].long() - s] = True
            counts.append(int(kept.sum()))
            assert kept[n - WINDOW :].all()
            older = kept[: n - WINDOW]
            assert older.any() and not older.all()
            assert votes[h][older].min() >= votes[h][~older].max() - 1e-6
    assert max(counts) - min(counts) <= 1
    assert min(counts) == math.floor(ratio * n) or max(counts) == math.ceil(ratio * n)


def test_streaming_keeps_the_same_recent_window_in_every_head(tiny_engine, doc):
    ctx, _ = tiny_engine.ingest(doc, CompressionConfig("streaming", 0.25))
    s, n = ctx.prefix_len, ctx.context_len
    n_heads = sum(layer.n_heads for layer in ctx.layers)
    window = ctx.kept_pairs // n_heads
    for layer in ctx.layers:
        for h in range(layer.n_heads):
            pos = layer.positions[layer.head(h)].tolist()
            assert pos[:s] == list(range(s))
            assert pos[s:][-window:] == list(range(s + n - window, s + n))
            assert len(pos) - s in (window, window + 1)


@pytest.mark.parametrize("method", ["streaming", "snapkv", "h2o"])
def test_baselines_keep_kvzips_protected_prefix(tiny_engine, doc, method):
    """The sinks of every baseline are kvzip's protected prefix, whole, in every head."""
    kvzip = select(tiny_engine.score(_full(tiny_engine, doc)), 0.1)
    ctx = select(tiny_engine.score(_full(tiny_engine, doc), method=method), 0.1)
    s = kvzip.prefix_len
    assert ctx.prefix_len == s == len(doc.prefix_ids)
    for layer in ctx.layers:
        for h in range(layer.n_heads):
            assert layer.positions[layer.head(h)][:s].tolist() == list(range(s))


# --- head level: calibration store and ingest without a scoring pass -----------------------


def test_calibration_is_the_max_pair_score_per_head(tiny_engine):
    heads = calibrate(tiny_engine, [CALIBRATION, TEXT], chunk_size=64)
    expected = []
    for text in (CALIBRATION, TEXT):
        full = _full(tiny_engine, tiny_engine.encode_document(text), 64)
        scored = tiny_engine.score(full)
        expected.append(
            torch.stack(
                [
                    layer.scores.view(layer.n_heads, -1)[:, full.prefix_len :].amax(dim=1)
                    for layer in scored.layers
                ]
            )
        )
    assert torch.equal(heads, torch.maximum(*expected))


def test_head_scores_round_trip_and_missing_store(tiny_engine, tmp_path):
    with pytest.raises(InvalidInputError, match="kvzip calibrate"):
        load_head_scores(tmp_path, tiny_engine.identity)
    heads = torch.rand(tiny_engine.n_layers, 2)
    path = save_head_scores(tmp_path, tiny_engine.identity, heads)
    assert path == head_scores_path(tmp_path, tiny_engine.identity) and path.exists()
    assert torch.equal(load_head_scores(tmp_path, tiny_engine.identity), heads)


def test_head_level_keeps_whole_heads_by_calibrated_score(calibrated, doc):
    heads = load_head_scores(calibrated.config.head_scores_dir, calibrated.identity)
    ctx, _ = calibrated.ingest(doc, CompressionConfig("kvzip_head", 0.5))
    s, n = ctx.prefix_len, ctx.context_len
    kept = torch.stack([layer.lens - s for layer in ctx.layers]).float()  # (L, H)
    partial = ((kept > 0) & (kept < n)).sum()
    assert partial <= 1
    full_heads = heads[kept == n]
    empty_heads = heads[kept == 0]
    assert full_heads.numel() and empty_heads.numel()
    assert full_heads.min() >= empty_heads.max()


def test_http_schema_lists_every_method():
    from typing import get_args

    from app.schemas import MethodName

    assert get_args(MethodName) == METHODS


def test_calibrate_command_writes_the_store(tiny_model_dir, tiny_engine, tmp_path):
    from service.commands import main

    text = tmp_path / "calibration.txt"
    text.write_text(CALIBRATION, encoding="utf-8")
    argv = ["calibrate", "--text", str(text), "--model", str(tiny_model_dir), "--device", "cpu"]
    argv += ["--dtype", "float32", "--data-dir", str(tmp_path), "--chunk-size", "64"]
    assert main(argv) == 0
    stored = load_head_scores(tmp_path / "head_scores", tiny_engine.identity)
    torch.testing.assert_close(stored, calibrate(tiny_engine, [CALIBRATION], chunk_size=64))
