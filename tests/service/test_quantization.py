"""Quantized storage (issue 18): error bounds against a float64 reference, the stored
format (v1 objects still load, broken or foreign metadata refused), ids, and the fidelity
of a quantized context on the tiny model."""

from __future__ import annotations

import inspect
import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch

from service import codec
from service.config import CompressionConfig, EngineConfig, ServiceConfig
from service.engine import quantization, shared_prefix
from service.engine.fingerprints import ModelIdentity
from service.engine.kvcache import CompressedContext, KVzipCache, RaggedLayer
from service.errors import CorruptContextError, IncompatibleContextError, InvalidInputError
from service.serving.embedded import build_embedded_service
from service.serving.ids import context_id
from service.serving.validation import validated_compression
from service.types import CreateContextRequest, QueryRequest, SamplingParams

FP8_RELATIVE = 2.0**-4  # e4m3: 3 mantissa bits, round to nearest
FP8_SUBNORMAL = 2.0**-10  # half the smallest e4m3 subnormal step (2^-9), in units of scale
FLOAT32 = 2.0**-22  # float32 arithmetic of the dequantization, relative to the magnitudes


def _layer(lens: list[int], d: int = 64, seed: int = 0) -> RaggedLayer:
    """Keys with outlier channels and an offset, values plain; heads of uneven lengths."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    channel = torch.logspace(-2, 1.5, d, dtype=torch.float64)[torch.randperm(d, generator=g)]
    keys = torch.randn(n, d, generator=g, dtype=torch.float64) * channel + 3.0
    values = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    scores = torch.rand(n, generator=g)
    positions = torch.cat([torch.arange(x, dtype=torch.int32) for x in lens])
    return RaggedLayer(keys.float(), values.float(), cu, scores, positions)


LENS = [70, 3, 130, 0, 64]


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_scale(group_size):
    layer = _layer(LENS)
    stored = quantization.quantize(layer, "int4", group_size)
    keys, values = quantization.dequantize(stored, layer.cu_lens, "int4", group_size, torch.float64)
    n, d = layer.keys.shape
    groups = quantization.key_groups(layer.cu_lens, n, group_size)
    key_scale = stored["keys_scale"].double()[groups]
    key_error = (keys - layer.keys.double()).abs()
    assert (key_error <= key_scale / 2 * (1 + 1e-6) + FLOAT32 * 16).all()
    g = quantization.value_group(group_size, d)
    value_scale = stored["values_scale"].double().repeat_interleave(g, dim=1)
    value_error = (values - layer.values.double()).abs()
    assert (value_error <= value_scale / 2 * (1 + 1e-6) + FLOAT32).all()
    assert stored["keys"].shape == (n, d // 2) and stored["keys"].dtype == torch.uint8
    assert stored["keys_scale"].shape[0] == sum(-(-x // group_size) for x in LENS)


def test_int4_key_groups_never_straddle_heads():
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    groups = quantization.key_groups(cu, 12, 4)
    assert groups.tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("centred", [True, False])
def test_fp8_error_is_within_the_e4m3_bound(centred):
    layer = _layer(LENS)
    stored = quantization.quantize(layer, "fp8", 64, centred=centred)
    assert {f"{f}_mean" for f in ("keys", "values")} <= set(stored) or not centred
    assert not centred or set(stored) == set(quantization.stored_names("fp8", centred=True))
    keys, values = quantization.dequantize(stored, layer.cu_lens, "fp8", 64, torch.float64)
    head = quantization.head_of_row(layer.cu_lens, layer.keys.shape[0])
    for field, got in (("keys", keys), ("values", values)):
        exact = getattr(layer, field).double()
        mean = stored[f"{field}_mean"].double()[head] if centred else torch.zeros_like(exact)
        scale = stored[f"{field}_scale"].double()[head]
        bound = torch.maximum(FP8_RELATIVE * (exact - mean).abs(), FP8_SUBNORMAL * scale)
        slack = FLOAT32 * (exact.abs() + mean.abs())  # x - m and codes * s + m in float32
        assert ((got - exact).abs() <= bound * (1 + 1e-6) + slack).all(), field
        assert stored[field].dtype == torch.float8_e4m3fn
        amax = torch.stack([(exact - mean)[a:b].abs().amax(0) for a, b in _heads(layer) if b > a])
        present = [b > a for a, b in _heads(layer)]
        scale = stored[f"{field}_scale"]
        assert scale.dtype == torch.bfloat16 and (scale.float()[present] >= amax / 448).all()
    assert stored["keys_scale"].shape == (len(LENS), 64)


def test_fp8_centring_takes_out_each_heads_mean():
    """The stored mean is the float64 mean of the head's rows, to bf16; an empty head's is
    0; coding x - mean shrinks the error of keys with an offset (those of `_layer`: +3)."""
    layer = _layer(LENS)
    stored = quantization.quantize(layer, "fp8", 64, centred=True)
    for field in ("keys", "values"):
        mean = stored[f"{field}_mean"]
        assert mean.dtype == torch.bfloat16 and mean.shape == (len(LENS), 64)
        for h, (a, b) in enumerate(_heads(layer)):
            want = getattr(layer, field)[a:b].double().mean(0) if b > a else torch.zeros(64)
            got = mean[h].double()
            assert ((got - want.double()).abs() <= 2**-8 * want.abs() + 1e-6).all(), (field, h)
    plain = quantization.quantize(layer, "fp8", 64, centred=False)
    offset = layer.keys.std(0) < 1  # channels whose +3 offset outweighs their spread
    errors = []
    for tensors in (stored, plain):
        keys, _ = quantization.dequantize(tensors, layer.cu_lens, "fp8", 64, torch.float64)
        errors.append(float((keys - layer.keys.double())[:, offset].abs().mean()))
    assert int(offset.sum()) > 10 and errors[0] < errors[1] / 4


def _heads(layer: RaggedLayer) -> list[tuple[int, int]]:
    bounds = layer.cu_lens.tolist()
    return list(zip(bounds, bounds[1:], strict=False))


def test_dequantized_in_the_model_dtype():
    layer = _layer([40, 24])
    for scheme in quantization.SCHEMES:
        stored = quantization.quantize(layer, scheme, 32)
        keys, values = quantization.dequantize(stored, layer.cu_lens, scheme, 32, torch.bfloat16)
        assert keys.dtype == values.dtype == torch.bfloat16
        assert keys.shape == values.shape == layer.keys.shape


@pytest.mark.parametrize("scheme", quantization.SCHEMES)
def test_a_layer_that_keeps_no_rows_round_trips(scheme):
    """At a low ratio a layer may keep no context row at all (selection is global)."""
    layer = _layer([0, 0, 0])
    stored = quantization.quantize(layer, scheme, 64)
    quantization.check_shapes(stored, layer.cu_lens.tolist(), scheme, 64, layer=0)
    keys, values = quantization.dequantize(stored, layer.cu_lens, scheme, 64, torch.float32)
    assert keys.shape == values.shape == (0, 64)


# -- the stored object ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compressed(tiny_engine):
    doc = tiny_engine.encode_document("Quantized storage of a compressed cache. " * 20)
    return tiny_engine.ingest(doc, CompressionConfig("kvzip", 0.3, 64))[0]


def _rewrite(blob: bytes, meta_changes: dict, tensor_changes: dict | None = None) -> bytes:
    """The object with its metadata and some tensors replaced (the safetensors library)."""
    tensors = safetensors.torch.load(blob)
    meta = {**codec.read_metadata(blob), **meta_changes}
    meta = {k: v for k, v in meta.items() if v is not None}
    return safetensors.torch.save({**tensors, **(tensor_changes or {})}, meta)


def _decode(engine, blob: bytes, **kwargs) -> CompressedContext:
    """What the service does: the engine's prefix for the object, then decode."""
    ids = codec.prefix_ids(blob)
    prefix = engine.prefix_context(ids) if ids else None
    return codec.decode(blob, engine.identity, prefix=prefix, **kwargs)


@pytest.mark.parametrize(("scheme", "version"), [("fp8", "4"), ("int4", "3")])
def test_quantized_object_is_version_3_or_4_and_round_trips(
    tiny_engine, compressed, scheme, version
):
    blob = codec.encode(compressed, tiny_engine.identity, scheme, 32)
    meta = codec.read_metadata(blob)
    assert meta["format_version"] == version and meta["quantization"] == scheme
    assert meta["dtype"] == "float32" and meta["group_size"] == "32"
    stored = safetensors.torch.load(blob)
    s, n = compressed.prefix_len, compressed.context_len
    assert "layers.0.positions" not in stored and "layers.0.cu_lens" not in stored
    first = compressed.layers[0]
    assert stored["layers.0.kept"].shape == (first.n_heads, -(-n // 8))
    assert stored["layers.0.scores"].shape == (first.keys.shape[0] - first.n_heads * s,)
    assert codec.prefix_ids(blob) == compressed.context_ids[:s].tolist()
    back = _decode(tiny_engine, blob)  # dtype: the one quantized from
    prefix = tiny_engine.prefix_context(compressed.context_ids[:s].tolist())
    for a, b, p in zip(compressed.layers, back.layers, prefix.layers, strict=True):
        for field in ("cu_lens", "positions"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert b.scores.dtype == torch.float32 and b.positions.dtype == torch.int32
        assert torch.equal(b.scores, a.scores.half().float())  # fp16; the prefix's stays inf
        assert b.keys.dtype == torch.float32 and b.keys.shape == a.keys.shape
        is_prefix = a.positions < s  # the engine's own prefix rows, as a prefill makes them
        assert torch.equal(b.keys[is_prefix], p.keys) and torch.equal(b.values[is_prefix], p.values)
        torch.testing.assert_close(p.keys, a.keys[is_prefix], rtol=1e-4, atol=1e-5)
        scale = a.keys.abs().max() if scheme == "fp8" else a.keys.max() - a.keys.min()
        assert (b.keys - a.keys).abs().max() <= scale / 8
    full = len(codec.encode(compressed, tiny_engine.identity))  # fp32 on the CPU
    assert len(blob) < full / (2.5 if scheme == "fp8" else 3.5)


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_a_v3_object_holds_the_context_rows_and_nothing_else(tiny_engine, compressed, scheme):
    """Every byte accounted for: codes and scales (fp8: and means) of the context rows, fp16
    scores, one bit per (head, context token), the token ids; the prefix rows are not
    stored."""
    group = 32
    blob = codec.encode(compressed, tiny_engine.identity, scheme, group)
    (header,) = struct.unpack("<Q", blob[:8])
    s, n = compressed.prefix_len, compressed.context_len
    want = 4 * compressed.seq_len  # context_ids int32
    for layer in compressed.layers:
        h, d = layer.n_heads, layer.keys.shape[1]
        lens = [x - s for x in layer.lens.tolist()]
        rows = sum(lens)
        want += 2 * rows + h * -(-n // 8)  # scores fp16, kept bits
        if scheme == "fp8":
            want += 2 * rows * d + 2 * h * d * 2 * 2  # codes, bf16 scale and mean per (h, d)
        else:
            key_groups = sum(-(-x // group) for x in lens)
            value_groups = d // quantization.value_group(group, d)
            want += rows * d + 2 * key_groups * d * 2 + 2 * rows * value_groups * 2
    assert len(blob) - 8 - header == want


def test_a_v2_object_written_by_earlier_code_still_loads(tiny_engine, compressed):
    """The version 2 layout (every row quantized, prefix included; cu_lens, fp16 scores,
    int16 positions, float32 fp8 scales), written through the safetensors library."""
    tensors = {"context_ids": compressed.context_ids.to(torch.int32)}
    for i, layer in enumerate(compressed.layers):
        tensors[f"layers.{i}.cu_lens"] = layer.cu_lens
        tensors[f"layers.{i}.scores"] = layer.scores.half()
        tensors[f"layers.{i}.positions"] = layer.positions.to(torch.int16)
        for name, t in quantization.quantize(layer, "fp8", 64, centred=False).items():
            tensors[f"layers.{i}.{name}"] = t.float() if name.endswith("scale") else t
    meta = codec.read_metadata(codec.encode(compressed, tiny_engine.identity, "fp8", 64))
    blob = safetensors.torch.save(tensors, meta | {"format_version": "2"})
    assert meta["format_version"] == "4"
    assert codec.prefix_ids(blob) is None
    back = codec.decode(blob, tiny_engine.identity)  # no prefix needed: it is stored
    for a, b in zip(compressed.layers, back.layers, strict=True):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.cu_lens, b.cu_lens)
        assert (b.keys - a.keys).abs().max() <= a.keys.abs().max() / 8


def test_a_v3_fp8_object_written_before_centring_still_loads(tiny_engine, compressed):
    """fp8 in the version 3 layout, no means (what code before centring wrote), through the
    safetensors library; it decodes as it did then."""
    s, n = compressed.prefix_len, compressed.context_len
    tensors = {"context_ids": compressed.context_ids.to(torch.int32)}
    for i, layer in enumerate(compressed.layers):
        rest, kept = shared_prefix.split(layer, s, n)
        tensors |= {f"layers.{i}.kept": kept, f"layers.{i}.scores": rest.scores.half()}
        for name, t in quantization.quantize(rest, "fp8", 64, centred=False).items():
            tensors[f"layers.{i}.{name}"] = t
    meta = codec.read_metadata(codec.encode(compressed, tiny_engine.identity, "fp8", 64))
    blob = safetensors.torch.save(tensors, meta | {"format_version": "3"})
    back = _decode(tiny_engine, blob)
    for a, b in zip(compressed.layers, back.layers, strict=True):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.cu_lens, b.cu_lens)
        for field in ("keys", "values"):
            exact, got = getattr(a, field), getattr(b, field)
            assert (
                (got - exact).abs() <= FP8_RELATIVE * exact.abs() + 1e-6 * exact.abs().max()
            ).all()
    as_v4 = _rewrite(blob, {"format_version": "4"})  # no means: not a version 4 object
    with pytest.raises(CorruptContextError, match="incomplete or broken"):
        _decode(tiny_engine, as_v4)


def test_fp8_version_metadata_that_does_not_fit_the_tensors_is_refused(tiny_engine, compressed):
    blob = codec.encode(compressed, tiny_engine.identity, "fp8", 64)
    with pytest.raises(CorruptContextError, match="means that format version 3"):
        _decode(tiny_engine, _rewrite(blob, {"format_version": "3"}))  # the means ignored
    with pytest.raises(CorruptContextError, match="format version 4 names quantization 'int4'"):
        _decode(tiny_engine, _rewrite(blob, {"quantization": "int4"}))
    mean = safetensors.torch.load(blob)["layers.2.values_mean"]
    for broken in (mean[:-1], mean[:, :-1]):
        bad = _rewrite(blob, {}, {"layers.2.values_mean": broken.contiguous()})
        with pytest.raises(CorruptContextError, match="layer 2: values_mean"):
            _decode(tiny_engine, bad)


def test_a_v3_object_needs_its_own_prefix(tiny_engine, compressed):
    blob = codec.encode(compressed, tiny_engine.identity, "fp8", 64)
    with pytest.raises(ValueError, match="needs prefix="):
        codec.decode(blob, tiny_engine.identity)
    ids = codec.prefix_ids(blob)
    other = tiny_engine.prefix_context([*ids[:-1], (ids[-1] + 1) % 100])
    with pytest.raises(ValueError, match="not the prefix"):
        codec.decode(blob, tiny_engine.identity, prefix=other)


def test_the_engine_keeps_its_prefix_contexts(tiny_engine):
    ids = tiny_engine.encode_document("Anything.").prefix_ids
    first = tiny_engine.prefix_context(ids)
    assert tiny_engine.prefix_context(ids) is first
    assert first.seq_len == first.prefix_len == len(ids)
    assert all(layer.keys.shape[0] == layer.n_heads * len(ids) for layer in first.layers)


def test_a_broken_kept_mask_is_refused(tiny_engine, compressed):
    blob = codec.encode(compressed, tiny_engine.identity, "int4", 32)
    kept = safetensors.torch.load(blob)["layers.2.kept"]
    past_the_end = kept.clone()
    past_the_end[0, -1] |= 0x80  # a token after the context (context_len is not a multiple of 8)
    assert compressed.context_len % 8 != 0
    for broken, message in ((past_the_end, "past the context"), (kept[:, 1:], "does not fit")):
        bad = _rewrite(blob, {}, {"layers.2.kept": broken.contiguous()})
        with pytest.raises(CorruptContextError, match=message):
            _decode(tiny_engine, bad)
    extra = kept.clone()
    extra[1, 0] ^= 0x01  # one more (or one fewer) row than the codes hold
    with pytest.raises(CorruptContextError, match="do not fit"):
        _decode(tiny_engine, _rewrite(blob, {}, {"layers.2.kept": extra}))


def test_an_unquantized_object_is_version_1_as_before(tiny_engine, compressed):
    blob = codec.encode(compressed, tiny_engine.identity)
    meta = codec.read_metadata(blob)
    assert meta["format_version"] == "1" and "quantization" not in meta
    assert "group_size" not in meta


def test_a_v1_object_written_by_earlier_code_still_loads(tiny_engine, compressed):
    """The layout code before quantization wrote, through the safetensors library."""
    tensors = {"context_ids": compressed.context_ids.to(torch.int32)}
    for i, layer in enumerate(compressed.layers):
        for field in ("keys", "values", "cu_lens", "scores", "positions"):
            tensors[f"layers.{i}.{field}"] = getattr(layer, field)
    meta = codec.read_metadata(codec.encode(compressed, tiny_engine.identity))
    back = codec.decode(safetensors.torch.save(tensors, meta), tiny_engine.identity)
    for a, b in zip(compressed.layers, back.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"quantization": "int2"}, IncompatibleContextError, "quantization 'int2'"),
        ({"quantization": None}, IncompatibleContextError, "quantization 'none'"),
        ({"format_version": "1"}, CorruptContextError, "format version 1 names"),
        ({"format_version": "4"}, CorruptContextError, "version 4 names quantization 'int4'"),
        ({"format_version": "5"}, IncompatibleContextError, "format version"),
        ({"group_size": "abc"}, CorruptContextError, "group_size"),
        ({"group_size": "64"}, CorruptContextError, "keys_scale"),
        ({"quantization": "fp8"}, CorruptContextError, "do not fit the stored fp8"),
        ({"dtype": "int8"}, CorruptContextError, "dtype"),
    ],
)
def test_mismatched_quantization_metadata_is_refused(
    tiny_engine, compressed, changes, error, message
):
    blob = codec.encode(compressed, tiny_engine.identity, "int4", 32)
    with pytest.raises(error, match=message):
        _decode(tiny_engine, _rewrite(blob, changes))


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_tensors_that_do_not_fit_their_layout_are_refused(tiny_engine, compressed, scheme):
    blob = codec.encode(compressed, tiny_engine.identity, scheme, 32)
    scale = safetensors.torch.load(blob)["layers.1.keys_scale"]
    shorter = {"layers.1.keys_scale": scale[:-1].contiguous()}
    with pytest.raises(CorruptContextError, match="layer 1: keys_scale"):
        _decode(tiny_engine, _rewrite(blob, {}, shorter))
    codes = safetensors.torch.load(blob)["layers.0.values"]
    retyped = {"layers.0.values": codes.view(torch.uint8).to(torch.float16)}
    with pytest.raises(CorruptContextError, match="values"):
        _decode(tiny_engine, _rewrite(blob, {}, retyped))


def test_a_truncated_quantized_object_is_refused(tiny_engine, compressed):
    blob = codec.encode(compressed, tiny_engine.identity, "int4", 64)
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    assert header["__metadata__"]["quantization"] == "int4"
    with pytest.raises(CorruptContextError):
        _decode(tiny_engine, blob[: len(blob) - 100])


# -- settings and ids ------------------------------------------------------------------------


def test_quantization_settings_are_validated():
    with pytest.raises(InvalidInputError, match="unknown quantization 'int8'"):
        validated_compression(CompressionConfig(quantization="int8"))
    with pytest.raises(InvalidInputError, match="group_size must be one of"):
        validated_compression(CompressionConfig(quantization="int4", group_size=48))
    fp8 = validated_compression(CompressionConfig(quantization="fp8", group_size=32))
    assert fp8.group_size == 64  # int4 only: not part of an fp8 context's identity


def test_ids_change_only_for_quantized_contexts():
    identity = {"model": "m", "model_fingerprint": "m", "tokenizer_fingerprint": "t"}
    identity["format_version"] = "1"

    def cid(**settings: object) -> str:
        compression = validated_compression(CompressionConfig(**settings))  # type: ignore[arg-type]
        return context_id(identity, compression, "", None, "doc")

    plain = cid()
    assert cid(group_size=128) == plain  # unquantized: group_size is not part of the id
    assert len({plain, cid(quantization="fp8"), cid(quantization="int4")}) == 3
    assert cid(quantization="int4", group_size=32) != cid(quantization="int4")


# -- fidelity on the tiny model ----------------------------------------------------------------


@torch.inference_mode()
def _next_token_logprobs(engine, ctx, prompt: list[int]) -> torch.Tensor:
    cache = KVzipCache(ctx, engine.n_layers)
    model = engine.model
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(
        input_ids=torch.tensor([prompt]),
        position_ids=torch.arange(ctx.seq_len, ctx.seq_len + len(prompt))[None],
        use_cache=True,
        kvzip_cache=cache,
        logits_to_keep=len(prompt),
        **{name: cache},
    )
    return torch.log_softmax(out.logits[0].double(), dim=-1)


@pytest.mark.parametrize(("scheme", "bound"), [("fp8", 1e-3), ("int4", 2e-2)])
def test_quantized_context_keeps_the_next_token_distribution(
    tiny_engine, compressed, scheme, bound
):
    """Mean KL(unquantized || quantized) of the next-token distributions over a question."""
    prompt = tiny_engine.encode_question("What is stored in the cache?")
    reference = _next_token_logprobs(tiny_engine, compressed, prompt)
    blob = codec.encode(compressed, tiny_engine.identity, scheme, 64)
    quantized = _next_token_logprobs(tiny_engine, _decode(tiny_engine, blob), prompt)
    kl = (reference.exp() * (reference - quantized)).sum(-1).mean()
    assert 0 <= float(kl) < bound


async def test_a_quantized_context_reports_its_bytes_and_answers_alike_after_reload(
    tiny_engine, tmp_path: Path
):
    config = ServiceConfig(engine=EngineConfig(model="tiny"), data_dir=tmp_path)
    svc = build_embedded_service(config, engine=tiny_engine)
    await svc.start()
    text = "The museum opens at nine. Tickets cost twelve euros. " * 8
    plain, _ = await svc.create_context(
        CreateContextRequest(text, compression=CompressionConfig("kvzip", 0.3, 64))
    )
    quantized = CompressionConfig("kvzip", 0.3, 64, quantization="int4")
    info, _ = await svc.create_context(CreateContextRequest(text, compression=quantized))
    assert info.id != plain.id and info.compression.quantization == "int4"
    stats = info.compression
    assert stats.bytes_full_bf16 == plain.compression.bytes_full_bf16 > 0
    assert stats.bytes < plain.compression.bytes / 3  # fp32 on the CPU, 4-bit codes stored
    question = QueryRequest("When does the museum open?", SamplingParams(max_new_tokens=6))
    first = await svc.query(info.id, question)
    svc.resident.drop(info.id)  # the next answer reads the stored object back
    assert (await svc.query(info.id, question)).answer == first.answer
    assert svc.resident.misses >= 1
    await svc.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_dequantization_on_the_gpu_matches_the_cpu(scheme):
    """The codes are uploaded and dequantized on the device, to the model dtype, and give
    what the CPU path gives."""
    layers = tuple(_layer(LENS, seed=s) for s in range(3))
    ctx = CompressedContext(
        layers=layers,
        context_ids=torch.arange(200, dtype=torch.int32),
        prefix_len=0,  # the heads of `_layer` do not all hold a prefix
        method="kvzip",
        ratio=0.3,
        chunk_size=64,
        created_at=0.0,
    )
    identity = ModelIdentity("m", "f" * 64, "t" * 64)
    blob = codec.encode(ctx, identity, scheme, 64)
    on_cpu = codec.decode(blob, identity, "cpu", torch.float32)
    on_gpu = codec.decode(blob, identity, "cuda", torch.bfloat16)
    for a, b in zip(on_cpu.layers, on_gpu.layers, strict=True):
        assert b.keys.is_cuda and b.keys.dtype == torch.bfloat16
        torch.testing.assert_close(b.keys.float().cpu(), a.keys, rtol=2**-7, atol=1e-6)
        torch.testing.assert_close(b.values.float().cpu(), a.values, rtol=2**-7, atol=1e-6)
        assert torch.equal(b.positions.cpu(), a.positions)
    quantized_on_gpu = codec.encode(
        replace(ctx, layers=tuple(_cuda(x) for x in layers)), identity, scheme, 64
    )
    assert len(quantized_on_gpu) == len(blob)  # same layout; a code may round differently
    again = codec.decode(quantized_on_gpu, identity, "cpu", torch.float32)
    for exact, a, b in zip(layers, on_cpu.layers, again.layers, strict=True):
        for field in ("keys", "values"):
            x = getattr(exact, field)
            cpu_error = (getattr(a, field) - x).abs().max()
            assert (getattr(b, field) - x).abs().max() <= 2 * cpu_error + 1e-6, field


def _cuda(layer: RaggedLayer) -> RaggedLayer:
    return RaggedLayer(
        *(getattr(layer, f).cuda() for f in ("keys", "values", "cu_lens", "scores", "positions"))
    )


def test_per_head_reductions_match_masked_dense_ones():
    """fp8's per-(head, channel) mean and amax over contiguous rows, a head without rows
    included, against a dense masked reference."""
    from service.engine.quantization import _per_head

    gen = torch.Generator().manual_seed(7)
    lens = [5, 0, 3, 9]
    x = torch.randn(sum(lens), 6, generator=gen)
    head = torch.repeat_interleave(torch.arange(4), torch.tensor(lens))
    for h in range(4):
        rows = x[head == h].double()
        want_mean = rows.mean(0) if len(rows) else torch.zeros(6, dtype=torch.float64)
        want_amax = rows.abs().amax(0) if len(rows) else torch.zeros(6, dtype=torch.float64)
        assert torch.allclose(_per_head(x, lens, "mean")[h].double(), want_mean, atol=1e-6)
        assert torch.equal(_per_head(x, lens, "amax")[h].double(), want_amax)


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_a_loaded_quantized_context_has_the_unquantized_layout(tiny_engine, compressed, scheme):
    """Decode runs on what loading makes: the same rows, positions, head lengths, dtypes and
    contiguous storage as the unquantized context, so nothing in a step differs but values."""
    loaded = _decode(tiny_engine, codec.encode(compressed, tiny_engine.identity, scheme))
    assert torch.equal(loaded.context_ids, compressed.context_ids)
    for a, b in zip(compressed.layers, loaded.layers, strict=True):
        for field in ("keys", "values", "positions", "cu_lens", "scores"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x.shape, x.dtype, x.stride()) == (y.shape, y.dtype, y.stride()), field
            assert y.is_contiguous(), field
        assert torch.equal(a.positions, b.positions) and torch.equal(a.cu_lens, b.cu_lens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_the_compiled_dequantization_kernel_matches_the_torch_path(scheme):
    """On a GPU `dequantize` is one Triton launch per layer; it gives the torch path's bits
    (bf16 rounding of the same float32 arithmetic; a fused multiply-add may move one ulp)."""
    from service.engine.backends import triton_dequant

    layer = _cuda(_layer([0, 700, 3, 0, 1300, 640], d=128, seed=5))
    stored = quantization.quantize(layer, scheme, 64)
    got = quantization.dequantize(stored, layer.cu_lens, scheme, 64, torch.bfloat16)
    want = quantization.dequantize_torch(stored, layer.cu_lens, scheme, 64, torch.bfloat16)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.bfloat16 and a.is_cuda
        torch.testing.assert_close(a, b, rtol=2**-7, atol=0.0)
        assert (a == b).float().mean() > 0.999
    codes = torch.arange(256, dtype=torch.int32, device="cuda").to(torch.uint8).view(16, 16)
    fp8 = {f: torch.ones(1, 16, device="cuda") for f in quantization.stored_names("fp8")}
    fp8 |= {"keys": codes.view(quantization.FP8), "values": codes.view(quantization.FP8)}
    cu = torch.tensor([0, 16], dtype=torch.int32, device="cuda")
    keys, _ = triton_dequant.dequantize(fp8, cu, "fp8", 64, 16, torch.float32)
    torch.testing.assert_close(keys, codes.view(quantization.FP8).float(), equal_nan=True)


def test_a_kernel_that_fails_to_build_leaves_the_torch_path(monkeypatch):
    """A dequantization kernel that raises (does not compile on this device) is logged once
    and the torch ops serve this and every later layer."""
    calls = []

    class Broken:
        @staticmethod
        def dequantize(*args):
            calls.append(args)
            raise RuntimeError("no kernel here")

    monkeypatch.setattr(quantization, "_KERNEL_FAILURES", [])
    real = quantization._kernels
    monkeypatch.setattr(
        quantization, "_kernels", lambda device, d: real(device, d) if calls else Broken
    )
    layer = _layer(LENS)
    stored = quantization.quantize(layer, "fp8", 64)
    want = quantization.dequantize_torch(stored, layer.cu_lens, "fp8", 64, torch.float32)
    for _ in range(2):
        got = quantization.dequantize(stored, layer.cu_lens, "fp8", 64, torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert len(calls) == 1 and quantization._KERNEL_FAILURES == ["RuntimeError('no kernel here')"]
    assert real(torch.device("cuda"), 64) is None  # after a failure, never again


@pytest.mark.parametrize("error", [0.0, 0.05])
def test_the_kernel_is_checked_against_the_torch_ops_on_its_first_layer(monkeypatch, error):
    """The first kernel result per (scheme, dtype) is compared with the torch ops; a wrong
    one is never returned (the torch ops serve from then on), a right one is trusted."""
    reference = quantization.dequantize_torch
    torch_calls = []

    def counted(*args):
        torch_calls.append(args)
        return reference(*args)

    class Kernel:
        @staticmethod
        def dequantize(tensors, cu_lens, scheme, group_size, g, dtype):
            keys, values = reference(tensors, cu_lens, scheme, group_size, dtype)
            return keys * (1 + error), values

    monkeypatch.setattr(quantization, "_KERNEL_FAILURES", [])
    monkeypatch.setattr(quantization, "_KERNEL_CHECKED", set())
    monkeypatch.setattr(quantization, "dequantize_torch", counted)
    failures = quantization._KERNEL_FAILURES
    monkeypatch.setattr(quantization, "_kernels", lambda device, d: None if failures else Kernel)
    layer = _layer(LENS)
    stored = quantization.quantize(layer, "int4", 64)
    want = reference(stored, layer.cu_lens, "int4", 64, torch.bfloat16)
    for _ in range(3):
        got = quantization.dequantize(stored, layer.cu_lens, "int4", 64, torch.bfloat16)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    if error:  # checked, refused, then the torch ops every time
        assert len(failures) == 1 and len(torch_calls) == 4
    else:  # checked once, then trusted
        assert ("int4", torch.bfloat16) in quantization._KERNEL_CHECKED
        assert len(torch_calls) == 1
