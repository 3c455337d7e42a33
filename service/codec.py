"""Safetensors codec of a CompressedContext (DESIGN.md, "Storage format").

Tensors: layers.{l}.keys / values (N_l, d) in the KV dtype, layers.{l}.cu_lens int32 (H+1),
layers.{l}.scores fp32 (N_l), layers.{l}.positions int32 (N_l), context_ids int32.
`__metadata__` (strings): format_version, model, model_fingerprint, tokenizer_fingerprint,
dtype, prefix_len, context_len, n_layers, method, ratio, chunk_size, created_at, and
`record`: the context's record (tenant, times, expiry, ...; service.serving.records), so that
a record lost with Redis or deleted from disk is rebuilt from the object alone. Readers ignore
entries they do not know, so objects without `record` still load.

Quantized keys/values (service.engine.quantization) make a format version 2 object: the
metadata adds `quantization` (fp8 | int4) and `group_size`, `dtype` is the dtype they were
quantized from, keys/values hold the codes and `layers.{l}.{keys,values}_{scale,zero}` the
rest; scores are fp16 and positions int16 while every position fits (fp32 + int32 would be
8 of the 80 bytes of an int4 pair of a 64-channel head), read back as fp32 / int32.
Version 1 objects (`none`, what earlier code wrote) are byte for byte unchanged; code that
predates version 2 refuses such an object (format version) instead of reading codes as
floats. Never pickle: decoding is safetensors only and refuses foreign or broken objects.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import torch

from service.engine import quantization
from service.engine.fingerprints import FORMAT_VERSION, ModelIdentity
from service.engine.kvcache import CompressedContext, RaggedLayer
from service.engine.tensor_blob import ByteSource, pack, unpack
from service.errors import CorruptContextError, IncompatibleContextError
from service.metadata import read_metadata

__all__ = ["check_compatible", "decode", "encode", "read_metadata", "stored_quantization"]

QUANTIZED_FORMAT_VERSION = "2"
"""The format version of objects whose keys/values are quantized (fp8, int4)."""
DEFAULT_GROUP_SIZE = 64
_FIELDS = ("cu_lens", "scores", "positions")
_FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def encode(
    context: CompressedContext,
    identity: ModelIdentity,
    quantization_scheme: str = "none",
    group_size: int = DEFAULT_GROUP_SIZE,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """CompressedContext -> safetensors bytes (quantized where the context lives, then
    copied to the CPU). `extra`: more metadata entries (the context's record, so that the
    object describes itself: service.serving.records.describe)."""
    tensors = {"context_ids": context.context_ids.to(torch.int32)}
    compact = quantization_scheme != "none"
    for i, layer in enumerate(context.layers):
        for field in _FIELDS:
            tensors[f"layers.{i}.{field}"] = getattr(layer, field)
        if compact:
            tensors[f"layers.{i}.scores"] = layer.scores.half()
            if context.seq_len <= torch.iinfo(torch.int16).max:
                tensors[f"layers.{i}.positions"] = layer.positions.to(torch.int16)
        for name, t in quantization.quantize(layer, quantization_scheme, group_size).items():
            tensors[f"layers.{i}.{name}"] = t
    meta = _metadata(context, identity, quantization_scheme, group_size)
    return pack(tensors, {**(extra or {}), **meta})


def _metadata(
    context: CompressedContext, identity: ModelIdentity, scheme: str, group_size: int
) -> dict[str, str]:
    meta = {
        "format_version": FORMAT_VERSION,
        "model": identity.name,
        "model_fingerprint": identity.model_fingerprint,
        "tokenizer_fingerprint": identity.tokenizer_fingerprint,
        "dtype": str(context.layers[0].keys.dtype).removeprefix("torch."),
        "prefix_len": str(context.prefix_len),
        "context_len": str(context.context_len),
        "n_layers": str(len(context.layers)),
        "method": context.method,
        "ratio": repr(context.ratio),
        "chunk_size": str(context.chunk_size),
        "created_at": repr(context.created_at),
    }
    if scheme != "none":
        meta |= {
            "format_version": QUANTIZED_FORMAT_VERSION,
            "quantization": scheme,
            "group_size": str(group_size),
        }
    return meta


def check_compatible(meta: dict[str, str], identity: ModelIdentity) -> None:
    """Raise IncompatibleContextError unless format, model and tokenizer all match."""
    expected = {
        "model_fingerprint": identity.model_fingerprint,
        "tokenizer_fingerprint": identity.tokenizer_fingerprint,
    }
    if meta.get("format_version") != QUANTIZED_FORMAT_VERSION:
        expected = {"format_version": FORMAT_VERSION, **expected}
    for key, want in expected.items():
        if meta.get(key) != want:
            raise IncompatibleContextError(
                f"stored context was made with a different {key.replace('_', ' ')} "
                f"({meta.get(key)!r}, running {want!r}); register the document again"
            )


def stored_quantization(meta: dict[str, str]) -> tuple[str, int]:
    """(scheme, group size) the metadata names; version 1 objects are `none`.

    IncompatibleContextError for a scheme this code does not know, CorruptContextError for
    metadata that contradicts itself.
    """
    version, scheme = meta.get("format_version"), meta.get("quantization", "none")
    if version == FORMAT_VERSION:
        if scheme != "none":
            raise CorruptContextError(
                f"stored context of format version {version} names quantization {scheme!r}"
            )
        return "none", DEFAULT_GROUP_SIZE
    if scheme not in quantization.SCHEMES[1:]:
        raise IncompatibleContextError(
            f"stored context uses quantization {scheme!r}, which this server does not read "
            f"(it reads {quantization.SCHEMES[1:]}); register the document again"
        )
    group = meta.get("group_size", "")
    if not group.isdigit() or int(group) < 1:
        raise CorruptContextError(f"stored context has an invalid group_size {group!r}")
    if meta.get("dtype") not in _FLOATS:
        raise CorruptContextError(f"stored context has an invalid dtype {meta.get('dtype')!r}")
    return scheme, int(group)


def decode(
    data: ByteSource,
    identity: ModelIdentity,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> CompressedContext:
    """safetensors bytes (any bytes-like object, e.g. an mmap view) -> CompressedContext on
    `device` (keys/values cast to `dtype`; quantized ones are moved to `device` as codes and
    dequantized there, to `dtype` or else the dtype they were quantized from)."""
    meta = read_metadata(data)
    check_compatible(meta, identity)
    scheme, group_size = stored_quantization(meta)
    if dtype is None and scheme != "none":
        dtype = _FLOATS[meta["dtype"]]
    try:
        tensors = unpack(data, device)
        layers = tuple(
            _layer(tensors, i, device, dtype, scheme, group_size)
            for i in range(int(meta["n_layers"]))
        )
        return CompressedContext(
            layers=layers,
            context_ids=tensors["context_ids"].to(device),
            prefix_len=int(meta["prefix_len"]),
            method=meta["method"],
            ratio=float(meta["ratio"]),
            chunk_size=int(meta["chunk_size"]),
            created_at=float(meta["created_at"]),
        )
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, struct.error) as exc:
        raise CorruptContextError(f"stored context is incomplete or broken: {exc}") from exc


def _layer(
    tensors: dict[str, torch.Tensor],
    i: int,
    device: torch.device | str,
    dtype: torch.dtype | None,
    scheme: str,
    group_size: int,
) -> RaggedLayer:
    parts = {f: tensors[f"layers.{i}.{f}"].to(device) for f in _FIELDS}
    if scheme != "none":  # compact side data of version 2: back to the resident dtypes
        parts["scores"] = parts["scores"].float()
        parts["positions"] = parts["positions"].to(torch.int32)
    stored = {n: tensors[f"layers.{i}.{n}"].to(device) for n in quantization.stored_names(scheme)}
    quantization.check_shapes(stored, parts["cu_lens"], scheme, group_size, layer=i)
    if dtype is None:
        keys, values = stored["keys"], stored["values"]
    else:
        keys, values = quantization.dequantize(stored, parts["cu_lens"], scheme, group_size, dtype)
    return RaggedLayer(keys=keys, values=values, **parts)
