"""Safetensors codec: bit-exact round trip, refusal of foreign or broken objects."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from service import codec
from service.config import CompressionConfig
from service.errors import CorruptContextError, IncompatibleContextError


@pytest.fixture(scope="module")
def compressed(tiny_engine):
    doc = tiny_engine.encode_document("Bit-exact storage of a compressed cache. " * 20)
    return tiny_engine.ingest(doc, CompressionConfig("kvzip", 0.3, 64))[0]


def test_round_trip_is_bit_exact(tiny_engine, compressed):
    blob = codec.encode(compressed, tiny_engine.identity)
    back = codec.decode(blob, tiny_engine.identity)
    assert torch.equal(back.context_ids, compressed.context_ids)
    for a, b in zip(compressed.layers, back.layers, strict=True):
        for field in ("keys", "values", "cu_lens", "scores", "positions"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and torch.equal(x, y), field
    for field in ("prefix_len", "method", "ratio", "chunk_size", "created_at"):
        assert getattr(back, field) == getattr(compressed, field)


def test_metadata_describes_the_object(tiny_engine, compressed):
    meta = codec.read_metadata(codec.encode(compressed, tiny_engine.identity))
    assert meta["format_version"] == "1"
    assert meta["model_fingerprint"] == tiny_engine.identity.model_fingerprint
    assert meta["dtype"] == "float32" and meta["method"] == "kvzip"
    assert int(meta["context_len"]) == compressed.context_len


@pytest.mark.parametrize("field", ["model_fingerprint", "tokenizer_fingerprint"])
def test_foreign_fingerprint_is_refused(tiny_engine, compressed, field):
    blob = codec.encode(compressed, tiny_engine.identity)
    other = dataclasses.replace(tiny_engine.identity, **{field: "0" * 64})
    with pytest.raises(IncompatibleContextError, match=field.replace("_", " ")):
        codec.decode(blob, other)


@pytest.mark.parametrize("mangle", [lambda b: b[:100], lambda b: b"not safetensors", lambda b: b""])
def test_unparseable_blob_is_refused(tiny_engine, compressed, mangle):
    blob = codec.encode(compressed, tiny_engine.identity)
    with pytest.raises(CorruptContextError):
        codec.decode(mangle(blob), tiny_engine.identity)
