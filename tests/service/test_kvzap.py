"""KVzap: the fits, the predictor store, NVIDIA's released format, and method `kvzap` at ingest.

The engine tests use the tiny random model with a predictor stored for it; ingest must
score inside the prefill (one prefill forward, no reconstruction pass) and give the same
scores as an independent application of the predictor to the recorded attention inputs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from service.compression.learned.calibration import CalibrationSettings, collect, score_text, split
from service.compression.learned.fit import MLPSettings, fit_mlp, fit_ridge, predict_all, r2_score
from service.compression.learned.predictor import (
    KVzapPredictor,
    load_predictor,
    load_predictor_file,
    predictor_path,
    save_predictor,
)
from service.compression.learned.released import load_released
from service.compression.learned.targets import rank_normal, spearman, top_recall
from service.compression.scorers.kvzap import KVzapScorer, predictor_dir
from service.compression.scorers.kvzip_plus import KVzipPlusScorer
from service.compression.selection import WINDOW, budget, select
from service.config import CompressionConfig
from service.engine.attention_hook import attention_inputs
from service.engine.fingerprints import ModelIdentity
from service.errors import InvalidInputError
from tests.service.kvzap_testing import random_predictor, store_test_predictor

TEXT = (
    "The lighthouse keeper wrote the weather in a blue book every evening. In March the "
    "wind came from the west for nineteen days, and the supply boat missed two visits. "
) * 8


def _planted(n: int = 4000, n_layers: int = 2, d: int = 12, h: int = 3, noise: float = 1e-3):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, n_layers, d, generator=gen) * 2 + 0.5
    w = torch.randn(n_layers, h, d, generator=gen)
    b = torch.randn(n_layers, h, generator=gen)
    y = torch.einsum("nld,lhd->nlh", x, w) + b + noise * torch.randn(n, n_layers, h, generator=gen)
    return x, y, w, b


# --- fits ---------------------------------------------------------------------------------


def test_ridge_recovers_a_planted_linear_relation():
    x, y, w, b = _planted()
    predictor = fit_ridge(x, y)
    assert predictor.kind == "linear"
    torch.testing.assert_close(predictor.w1, w, atol=2e-3, rtol=0)
    torch.testing.assert_close(predictor.b1, b, atol=2e-3, rtol=0)
    assert r2_score(y, predict_all(predictor, x)) > 0.9999


def test_ridge_with_a_fixed_strength_is_the_closed_form():
    x, y, _, _ = _planted(n=300, n_layers=1, d=5, h=2, noise=0.5)
    predictor = fit_ridge(x, y, alpha=0.1)
    xc = x[:, 0].double() - x[:, 0].double().mean(0)
    yc = y[:, 0].double() - y[:, 0].double().mean(0)
    gram = xc.T @ xc
    lam = 0.1 * torch.linalg.eigvalsh(gram).mean()
    coef = torch.linalg.solve(gram + lam * torch.eye(5, dtype=torch.float64), xc.T @ yc)
    torch.testing.assert_close(predictor.w1[0].double(), coef.T, atol=1e-5, rtol=1e-5)


def test_mlp_learns_the_planted_relation_and_a_nonlinear_one():
    x, y, _, _ = _planted(n=1200, d=8)
    settings = MLPSettings(hidden=32, epochs=20, lr=1e-2, batch=128)
    assert r2_score(y, predict_all(fit_mlp(x, y, settings), x)) > 0.97
    bent = y.abs()  # no linear map fits |y| well; the GELU MLP does
    linear_r2 = r2_score(bent, predict_all(fit_ridge(x, bent), x))
    mlp_r2 = r2_score(bent, predict_all(fit_mlp(x, bent, settings), x))
    assert mlp_r2 > linear_r2 + 0.5, (mlp_r2, linear_r2)


def test_mlp_standardisation_is_folded_into_raw_weights():
    """Inputs with a large offset and scale: the returned weights apply to raw x."""
    x, y, _, _ = _planted(n=1200, n_layers=1, d=6)
    shifted = x * 50 + 300
    predictor = fit_mlp(shifted, y, MLPSettings(hidden=32, epochs=20, lr=1e-2, batch=128))
    assert r2_score(y, predict_all(predictor, shifted)) > 0.97


# --- the store ----------------------------------------------------------------------------


IDENTITY = ModelIdentity("tiny", "f" * 64, "t" * 64)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_saved_predictor_loads_bit_exact(tmp_path, kind):
    predictor = random_predictor(3, 10, 2, kind, hidden=7).with_meta(
        model_fingerprint=IDENTITY.model_fingerprint, train_loss=0.125, heldout_r2=0.5
    )
    path = save_predictor(predictor_path(tmp_path, IDENTITY, kind), predictor)
    loaded = load_predictor(tmp_path, IDENTITY, kind)
    for name in ("w1", "b1", "w2", "b2"):
        a, b = getattr(predictor, name), getattr(loaded, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
    x = torch.randn(5, 10)
    assert torch.equal(predictor.predict(2, x), loaded.predict(2, x))
    assert loaded.meta["kind"] == kind and loaded.meta["train_loss"] == "0.125"
    assert loaded.meta["heldout_r2"] == "0.5" and loaded.meta["format"] == "kvzap-predictor/1"
    assert path.name.endswith(f".{kind}.safetensors")


def test_store_prefers_the_mlp_and_refuses_other_models(tmp_path):
    other = ModelIdentity("other", "0" * 64, "t" * 64)
    with pytest.raises(InvalidInputError, match="kvzip calibrate-scorer"):
        load_predictor(tmp_path, IDENTITY)
    for kind in ("linear", "mlp"):
        p = random_predictor(2, 4, 2, kind).with_meta(model_fingerprint=IDENTITY.model_fingerprint)
        save_predictor(predictor_path(tmp_path, IDENTITY, kind), p)
    assert load_predictor(tmp_path, IDENTITY).kind == "mlp"
    assert load_predictor(tmp_path, IDENTITY, "linear").kind == "linear"
    # a file renamed onto another model's key is refused
    predictor_path(tmp_path, IDENTITY, "mlp").rename(predictor_path(tmp_path, other, "mlp"))
    with pytest.raises(InvalidInputError, match="another model"):
        load_predictor(tmp_path, other)


def test_a_file_that_is_not_a_predictor_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(InvalidInputError, match="not a KVzap predictor"):
        load_predictor_file(path)
    path.write_bytes(b"garbage")
    with pytest.raises(InvalidInputError, match="cannot read"):
        load_predictor_file(path)


# --- NVIDIA's released format ------------------------------------------------------------


def _released_modules(kind: str, n_layers: int, d: int, h: int, hidden: int) -> nn.ModuleList:
    """What kvpress's KVzapModel holds: one Linear or Linear-GELU-Linear per layer."""
    torch.manual_seed(3)
    if kind == "linear":
        return nn.ModuleList(nn.Linear(d, h) for _ in range(n_layers))
    return nn.ModuleList(
        nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, h))
        for _ in range(n_layers)
    )


def _write_released(folder, kind, n_layers=3, d=16, h=2, hidden=12, prefix="layers", shards=1):
    """A save_pretrained folder of KVzapModel (config.json + bf16 safetensors)."""
    modules = _released_modules(kind, n_layers, d, h, hidden).to(torch.bfloat16)
    folder.mkdir()
    config = {
        "architectures": ["KVzapModel"],
        "model_type": "kvzap",
        "input_dim": d,
        "output_dim": h,
        "hidden_dim": hidden if kind == "mlp" else None,
        "n_modules": n_layers,
        "dtype": "bfloat16",
        "transformers_version": "4.57.1",
    }
    (folder / "config.json").write_text(json.dumps(config))
    state = {f"{prefix}.{k}": v.contiguous() for k, v in modules.state_dict().items()}
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(state)
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in names[i::shards]}
            save_file(part, str(folder / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return modules


@pytest.mark.parametrize(
    ("kind", "prefix", "shards"),
    [("mlp", "layers", 1), ("linear", "layers", 1), ("mlp", "module_list", 2)],
)
def test_released_checkpoint_round_trip(tmp_path, kind, prefix, shards):
    modules = _write_released(tmp_path / "KVzap-x", kind, prefix=prefix, shards=shards)
    predictor = load_released(tmp_path / "KVzap-x")
    assert predictor.kind == kind and predictor.n_layers == 3
    assert (predictor.input_dim, predictor.output_dim) == (16, 2)
    assert predictor.meta["source"] == "released checkpoint KVzap-x"
    x = torch.randn(7, 16)
    for layer, module in enumerate(modules):
        expected = module.float()(x)
        torch.testing.assert_close(predictor.predict(layer, x), expected, atol=1e-5, rtol=1e-5)
    # stored for a model and loaded back: the same tensors
    stored = predictor.with_meta(model_fingerprint=IDENTITY.model_fingerprint)
    save_predictor(predictor_path(tmp_path, IDENTITY, kind), stored)
    loaded = load_predictor(tmp_path, IDENTITY, kind)
    assert torch.equal(loaded.w1, predictor.w1) and torch.equal(loaded.b1, predictor.b1)


def test_released_checkpoint_that_disagrees_with_its_config_is_refused(tmp_path):
    _write_released(tmp_path / "bad", "mlp")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "n_modules": 4}))
    with pytest.raises(InvalidInputError, match="config says"):
        load_released(tmp_path / "bad")
    with pytest.raises(InvalidInputError, match="cannot read"):
        load_released(tmp_path / "missing")


# --- method kvzap on the tiny model --------------------------------------------------------


@pytest.fixture()
def kvzap_engine(tiny_engine, tmp_path):
    """The tiny engine with a random MLP predictor stored in a fresh kvzap folder."""
    engine = tiny_engine.with_config(kvzap_dir=tmp_path / "kvzap")
    return engine, store_test_predictor(engine, "mlp", seed=4)


def _recorded_inputs(engine, ids):
    """Attention inputs of a plain forward over `ids`, recorded by independent hooks."""
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad(), attention_inputs(engine.model, lambda i, x: out.__setitem__(i, x[0])):
        engine.model(torch.tensor([ids]))
    return out


def test_ingest_scores_inside_the_prefill_without_reconstruction(kvzap_engine):
    engine, predictor = kvzap_engine
    doc = engine.encode_document(TEXT)
    forwards = []
    handle = engine.model.register_forward_hook(lambda *a: forwards.append(1))
    passes = engine.reconstruction_passes
    try:
        ctx, timings = engine.ingest(doc, CompressionConfig("kvzap", 0.3))
    finally:
        handle.remove()
    assert engine.reconstruction_passes == passes  # counted: no reconstruction pass
    assert timings.prefill_s > 0 and timings.scoring_s >= 0 and timings.selection_s > 0
    assert len(forwards) == math.ceil(len(doc.all_ids) / engine.config.prefill_chunk_tokens)
    assert ctx.method == "kvzap" and ctx.ratio == 0.3
    assert ctx.kept_pairs == budget(0.3, ctx.total_pairs)
    # the kept pairs are the top 30% of the predictor applied to the attention inputs
    s = ctx.prefix_len
    inputs = _recorded_inputs(engine, doc.all_ids)
    logits = [predictor.predict(i, inputs[i][s:]).T for i in range(engine.n_layers)]
    flat = torch.cat([x.reshape(-1) for x in logits])
    threshold = flat.sort(descending=True).values[budget(0.3, flat.numel()) - 1]
    for layer, pred in zip(ctx.layers, logits, strict=True):
        for h in range(layer.n_heads):
            kept = layer.positions[layer.head(h)][s:].long() - s
            expected = (pred[h] >= threshold).nonzero().squeeze(1)
            assert torch.equal(kept, expected)


def test_ingest_scores_equal_rescoring_a_stored_context(kvzap_engine):
    engine, _ = kvzap_engine
    doc = engine.encode_document(TEXT)
    ingested, _ = engine.ingest(doc, CompressionConfig("kvzap", 1.0))
    full = engine.prefill_context(doc, CompressionConfig("kvzap", 1.0))
    rescored = engine.score(full, method="kvzap")  # the fallback: context run over its prefix
    for a, b in zip(ingested.layers, rescored.layers, strict=True):
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=0)


def test_threshold_keeps_the_window_and_reports_the_achieved_ratio(kvzap_engine):
    engine, predictor = kvzap_engine
    doc = engine.encode_document(TEXT * 2)
    ctx, _ = engine.ingest(doc, CompressionConfig("kvzap", 0.3, threshold=-3.0).normalized())
    s, n = ctx.prefix_len, ctx.context_len
    assert n > WINDOW + 50
    inputs = _recorded_inputs(engine, doc.all_ids)
    kept_total = 0
    for i, layer in enumerate(ctx.layers):
        pred = predictor.predict(i, inputs[i][s:]).T  # (H, n)
        for h in range(layer.n_heads):
            positions = layer.positions[layer.head(h)].long()
            assert torch.equal(positions[:s], torch.arange(s))  # prefix always kept
            expected = pred[h] >= -3.0
            expected[n - WINDOW :] = True
            assert torch.equal(positions[s:] - s, expected.nonzero().squeeze(1))
            kept_total += int(expected.sum())
    assert 0 < kept_total < ctx.total_pairs
    assert ctx.kept_pairs == kept_total and ctx.ratio == kept_total / ctx.total_pairs
    # query-time re-selection: the recent window goes last
    smaller = engine.reselect(ctx, ctx.ratio / 2)
    assert smaller.kept_pairs == budget(ctx.ratio / 2, ctx.total_pairs)
    high, _ = engine.ingest(doc, CompressionConfig("kvzap", 1.0, threshold=90.0))
    for layer in high.layers:
        for h in range(layer.n_heads):
            assert layer.positions[layer.head(h)][s:].tolist() == list(range(s + n - WINDOW, s + n))


def test_threshold_belongs_to_kvzap():
    with pytest.raises(InvalidInputError, match="kvzap only"):
        CompressionConfig("kvzip", 0.3, threshold=-4.0).normalized()
    with pytest.raises(InvalidInputError, match="finite"):
        CompressionConfig("kvzap", 0.3, threshold=float("nan")).normalized()
    assert CompressionConfig("kvzap", 0.3, threshold=-4.0).normalized().ratio == 1.0


def test_kvzap_needs_a_predictor_that_fits_the_model(tiny_engine, tmp_path):
    engine = tiny_engine.with_config(kvzap_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="calibrate-scorer"):
        engine.check_method("kvzap")
    wrong = random_predictor(engine.n_layers, 5, 2).with_meta(
        model_fingerprint=engine.identity.model_fingerprint
    )
    save_predictor(predictor_path(tmp_path, engine.identity, "linear"), wrong)
    with pytest.raises(InvalidInputError, match="input dim"):
        engine.check_method("kvzap")
    with pytest.raises(InvalidInputError, match="calibrate-scorer"):  # the kind asked for
        engine.with_config(kvzap_kind="mlp").check_method("kvzap")


def test_predictor_dir_follows_the_data_dir(tiny_engine, tmp_path):
    engine = tiny_engine.with_config(head_scores_dir=tmp_path / "head_scores", kvzap_dir=None)
    assert predictor_dir(engine) == tmp_path / "kvzap"
    assert predictor_dir(engine.with_config(kvzap_dir=tmp_path / "p")) == tmp_path / "p"
    assert tiny_engine.config.kvzap_dir is None  # the shared engine is untouched


def test_an_explicit_predictor_overrides_the_store(kvzap_engine):
    engine, _ = kvzap_engine
    full = engine.prefill_context(engine.encode_document(TEXT), CompressionConfig("kvzap", 1.0))
    config = engine.model.config
    other = random_predictor(engine.n_layers, config.hidden_size, 2, "linear", seed=9)
    scores = KVzapScorer(other).score(engine, full)
    stored = KVzapScorer().score(engine, full)
    assert not torch.equal(scores[0], stored[0])
    assert select(engine.score(full, method=KVzapScorer(other)), 0.2).kept_pairs == budget(
        0.2, full.total_pairs
    )


# --- calibration ---------------------------------------------------------------------------


def test_calibration_samples_are_attention_inputs_and_log_kvzip_plus(tiny_engine):
    doc = tiny_engine.encode_document(TEXT)
    x, y = score_text(tiny_engine, TEXT)
    s, n = len(doc.prefix_ids), len(doc.context_ids)
    inputs = _recorded_inputs(tiny_engine, doc.all_ids)
    assert x.shape == (n, tiny_engine.n_layers, tiny_engine.model.config.hidden_size)
    for i in range(tiny_engine.n_layers):
        torch.testing.assert_close(x[:, i], inputs[i][s:], rtol=1e-5, atol=1e-5)
    # one chunk (full softmax): the kvzip_plus scores of the same text, as logs
    full = tiny_engine.prefill_context(doc, CompressionConfig("kvzip_plus", 1.0, n))
    plus = KVzipPlusScorer().score(tiny_engine, full)
    for i in range(tiny_engine.n_layers):
        torch.testing.assert_close(y[:, i], plus[i].T.clamp_min(1e-30).log())


def test_collect_samples_per_text_and_splits_by_text(tiny_engine):
    texts = [TEXT, TEXT[:300], TEXT[100:400]]
    settings = CalibrationSettings(tokens_per_text=20, heldout=0.34, window=8)
    samples = collect(tiny_engine, texts, settings, bar=False)
    assert samples.x.shape[0] == 60 and samples.text.tolist() == [0] * 20 + [1] * 20 + [2] * 20
    again = collect(tiny_engine, texts, settings, bar=False)
    assert torch.equal(samples.x, again.x)  # seeded
    train, test = split(samples, settings.heldout)
    assert set(train.text.tolist()) == {0, 1} and set(test.text.tolist()) == {2}


@pytest.mark.parametrize("kind", ["rank", "log"])
def test_collect_leaves_the_window_out_and_transforms_each_text(tiny_engine, kind):
    window = 16
    x, y = score_text(tiny_engine, TEXT, "kvzip", 2000)
    n = x.shape[0]
    settings = CalibrationSettings(tokens_per_text=10**6, window=window, transform=kind)
    got = collect(tiny_engine, [TEXT], settings, bar=False)
    assert got.x.shape[0] == n - window  # every position but the window, permuted

    def by_row(t: torch.Tensor) -> torch.Tensor:  # the last layer's input tells rows apart
        return t[torch.argsort(t[:, -1].sum(dim=-1))]

    torch.testing.assert_close(by_row(got.x), by_row(x[:-window]))
    assert got.log_y is not None
    torch.testing.assert_close(
        torch.sort(got.log_y.flatten()).values, torch.sort(y[:-window].flatten()).values
    )
    want = rank_normal(y[:-window]) if kind == "rank" else y[:-window]
    torch.testing.assert_close(
        torch.sort(got.y.flatten()).values, torch.sort(want.flatten()).values
    )


def test_rank_targets_and_ranking_metrics():
    y = torch.randn(50, 3, 2, generator=torch.Generator().manual_seed(0))
    z = rank_normal(y)
    assert torch.equal(torch.argsort(z.flatten()), torch.argsort(y.flatten()))  # same order
    assert abs(float(z.mean())) < 1e-6 and 0.9 < float(z.std()) < 1.05  # standard normal
    assert spearman(y, y.exp()) == pytest.approx(1.0)
    assert spearman(y, -y) == pytest.approx(-1.0)
    assert top_recall(y, y * 3 + 1) == 1.0 and top_recall(y, -y) == 0.0


def test_calibrate_scorer_command_writes_both_predictors(tiny_model_dir, tiny_engine, tmp_path):
    from service.commands import main

    paths = []
    for i, text in enumerate([TEXT, TEXT[200:], TEXT[:500]]):
        paths += ["--text", str(tmp_path / f"{i}.txt")]
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    argv = ["calibrate-scorer", *paths, "--model", str(tiny_model_dir), "--device", "cpu"]
    argv += ["--dtype", "float32", "--data-dir", str(tmp_path), "--tokens-per-text", "50"]
    argv += ["--hidden", "16", "--epochs", "3", "--heldout", "0.34", "--window", "16"]
    assert main(argv) == 0
    for kind in ("linear", "mlp"):
        predictor = load_predictor(tmp_path / "kvzap", tiny_engine.identity, kind)
        meta = predictor.meta
        assert meta["model_fingerprint"] == tiny_engine.identity.model_fingerprint
        assert meta["kind"] == kind and meta["source"] == "calibrated"
        assert (
            meta["target"] == "kvzip, chunks of 2000, rank-normal scores, last 16 tokens left out"
        )
        assert meta["target_method"] == "kvzip" and meta["target_transform"] == "rank"
        assert math.isfinite(float(meta["train_loss"])) and "heldout_r2" in meta
        assert -1 <= float(meta["heldout_spearman"]) <= 1
        assert 0 <= float(meta["heldout_top30_recall"]) <= 1
        assert len(json.loads(meta["heldout_r2_per_layer"])) == tiny_engine.n_layers


def test_calibrate_scorer_command_stores_a_released_checkpoint(
    tiny_model_dir, tiny_engine, tmp_path
):
    from service.commands import main

    config = tiny_engine.model.config
    _write_released(
        tmp_path / "KVzap-mlp-tiny",
        "mlp",
        n_layers=tiny_engine.n_layers,
        d=config.hidden_size,
        h=config.num_key_value_heads,
    )
    argv = ["calibrate-scorer", "--released", str(tmp_path / "KVzap-mlp-tiny")]
    argv += ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    assert main([*argv, "--data-dir", str(tmp_path)]) == 0
    stored = load_predictor(tmp_path / "kvzap", tiny_engine.identity, "mlp")
    assert stored.meta["source"] == "released checkpoint KVzap-mlp-tiny"
    assert torch.equal(stored.w1, load_released(tmp_path / "KVzap-mlp-tiny").w1)


def test_released_checkpoint_for_another_model_is_refused(tiny_model_dir, tmp_path, capsys):
    from service.commands import main

    _write_released(tmp_path / "KVzap-mlp-other", "mlp", d=32)
    argv = ["calibrate-scorer", "--released", str(tmp_path / "KVzap-mlp-other")]
    argv += ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    assert main([*argv, "--data-dir", str(tmp_path)]) == 1
    assert "input dim" in capsys.readouterr().err


def test_predictor_shapes_are_checked():
    with pytest.raises(ValueError, match="kind"):
        KVzapPredictor("cubic", torch.zeros(1, 2, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="mlp predictor has w2"):
        KVzapPredictor("mlp", torch.zeros(1, 2, 3), torch.zeros(1, 2))


def test_stored_predictor_reads_the_file_once_until_it_changes(tiny_engine, tmp_path, monkeypatch):
    """Every kvzap ingest asks for the predictor: only a new or rewritten file is read."""
    import os

    from service.compression.learned import predictor as predictor_module
    from service.compression.scorers import kvzap as kvzap_scorer

    engine = tiny_engine.with_config(kvzap_dir=tmp_path / "kvzap")
    store_test_predictor(engine, "linear", seed=3)
    reads = []
    real = predictor_module.load_predictor_file
    monkeypatch.setattr(
        predictor_module, "load_predictor_file", lambda p: reads.append(p) or real(p)
    )
    first = kvzap_scorer.stored_predictor(engine)
    assert kvzap_scorer.stored_predictor(engine) is first and len(reads) == 1
    path = reads[0]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert kvzap_scorer.stored_predictor(engine) is not first and len(reads) == 2
