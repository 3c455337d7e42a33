"""Safetensors codec of a CompressedContext (DESIGN.md, "Storage format").

Tensors: layers.{l}.keys / values (N_l, d) in the KV dtype, layers.{l}.cu_lens int32 (H+1),
layers.{l}.scores fp32 (N_l), layers.{l}.positions int32 (N_l), context_ids int32.
`__metadata__` (strings): format_version, model, model_fingerprint, tokenizer_fingerprint,
dtype, prefix_len, context_len, n_layers, method, ratio, chunk_size, created_at, and
`record`: the context's record (tenant, times, expiry, ...; service.serving.records), so that
a record lost with Redis or deleted from disk is rebuilt from the object alone. Readers ignore
entries they do not know, so objects without `record` still load.

Quantized keys/values (service.engine.quantization) make a format version 3 object: the
metadata adds `quantization` (fp8 | int4) and `group_size`, `dtype` is the dtype they were
quantized from. Only the context's rows are stored (service.engine.shared_prefix): per
layer the codes `layers.{l}.{keys,values}` and `layers.{l}.{keys,values}_{scale,zero}` of
the rows after the prefix, `layers.{l}.kept` (H, ceil(context_len / 8)) uint8, the context
tokens each head kept as bits, and `layers.{l}.scores` fp16 of those rows; no cu_lens or
positions. Decoding puts the engine's prefix rows back (`decode(..., prefix=)`; which
prefix: `prefix_ids`).

fp8 objects are format version 4: the version 3 layout, and each layer also stores
`layers.{l}.{keys,values}_mean` (H, d) bf16, the per-(head, channel) mean taken out before
coding (service.engine.quantization, "centred"). int4 objects stay version 3; version 3
fp8 objects (written before centring, no means) keep loading.

Version 2 objects (written before version 3) keep loading: every row quantized, prefix
included, cu_lens, fp16 scores and int16 (or int32) positions. Version 1 objects (`none`)
are byte for byte what earlier code wrote. Code that predates a version refuses its objects
(format version) instead of misreading them. Never pickle: decoding is safetensors only
and refuses foreign or broken objects.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import torch

from service.engine import quantization, shared_prefix
from service.engine.fingerprints import FORMAT_VERSION, ModelIdentity
from service.engine.kvcache import CompressedContext, RaggedLayer
from service.engine.tensor_blob import ByteSource, pack, unpack
from service.errors import CorruptContextError, IncompatibleContextError
from service.metadata import header_length, read_metadata

__all__ = ["check_compatible", "decode", "encode", "read_metadata", "stored_quantization"]

QUANTIZED_FORMAT_VERSION = "3"
"""The format version of int4 objects (and of fp8 objects written before centring)."""
CENTRED_FP8_VERSION = "4"
"""The format version of fp8 objects: version 3 plus the per-(head, channel) means."""
_CONTEXT_ROWS_ONLY = (QUANTIZED_FORMAT_VERSION, CENTRED_FP8_VERSION)
V2 = "2"
"""Quantized objects written before the prefix was left out: still read."""
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
    for i, layer in enumerate(context.layers):
        if quantization_scheme == "none":
            tensors |= {f"layers.{i}.{f}": getattr(layer, f) for f in _FIELDS}
            stored = {"keys": layer.keys, "values": layer.values}
        else:
            rest, kept = shared_prefix.split(layer, context.prefix_len, context.context_len)
            tensors |= {f"layers.{i}.kept": kept, f"layers.{i}.scores": rest.scores.half()}
            stored = quantization.quantize(rest, quantization_scheme, group_size)
        tensors |= {f"layers.{i}.{name}": t for name, t in stored.items()}
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
            "format_version": _version(scheme),
            "quantization": scheme,
            "group_size": str(group_size),
        }
    return meta


def _version(scheme: str) -> str:
    """The format version an object quantized with `scheme` is written in."""
    return CENTRED_FP8_VERSION if scheme == "fp8" else QUANTIZED_FORMAT_VERSION


def prefix_ids(data: ByteSource) -> list[int] | None:
    """The prefix tokens whose rows a version 3 or 4 object leaves out (when not empty:
    fetch `KVzipEngine.prefix_context` of them for `decode`); None for other versions."""
    header = _header(data)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format_version") not in _CONTEXT_ROWS_ONLY:
        return None
    try:
        s = int(meta["prefix_len"])
        entry = header["context_ids"]
        start = 8 + struct.unpack("<Q", memoryview(data).cast("B")[:8])[0]
        begin, end = (start + int(o) for o in entry["data_offsets"])
        if entry["dtype"] != "I32" or not 0 <= s <= (end - begin) // 4:
            raise ValueError(f"context_ids {entry['dtype']} cannot hold {s} prefix tokens")
        view = memoryview(data).cast("B")[begin : begin + 4 * s]
        return list(struct.unpack(f"<{s}i", view))
    except (KeyError, ValueError, TypeError, struct.error) as exc:
        raise CorruptContextError(f"stored context has no readable prefix: {exc}") from exc


def _header(data: ByteSource) -> dict:  # type: ignore[type-arg]
    try:
        view = memoryview(data).cast("B")
        header = json.loads(bytes(view[8 : header_length(view)]))
    except (struct.error, ValueError, TypeError) as exc:
        raise CorruptContextError(f"stored context does not parse as safetensors: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptContextError("stored context does not parse as safetensors: not a header")
    return header


def check_compatible(meta: dict[str, str], identity: ModelIdentity) -> None:
    """Raise IncompatibleContextError unless format, model and tokenizer all match."""
    expected = {
        "model_fingerprint": identity.model_fingerprint,
        "tokenizer_fingerprint": identity.tokenizer_fingerprint,
    }
    if meta.get("format_version") not in (*_CONTEXT_ROWS_ONLY, V2):
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
    metadata that contradicts itself (a version that does not hold that scheme).
    """
    version, scheme = meta.get("format_version"), meta.get("quantization", "none")
    only = {FORMAT_VERSION: "none", CENTRED_FP8_VERSION: "fp8"}.get(version or "")
    if only is not None and scheme != only:
        raise CorruptContextError(
            f"stored context of format version {version} names quantization {scheme!r}"
        )
    if version == FORMAT_VERSION:
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
    prefix: CompressedContext | None = None,
) -> CompressedContext:
    """safetensors bytes (any bytes-like object, e.g. an mmap view) -> CompressedContext on
    `device` (keys/values cast to `dtype`; quantized ones are moved to `device` as codes and
    dequantized there, to `dtype` or else the dtype they were quantized from).

    prefix: for a version 3 or 4 object, the all-kept context of its `prefix_ids` (the engine's
    `prefix_context`), whose rows are put back in front of every head's; ignored otherwise.
    """
    meta = read_metadata(data)
    check_compatible(meta, identity)
    scheme, group_size = stored_quantization(meta)
    if dtype is None and scheme != "none":
        dtype = _FLOATS[meta["dtype"]]
    front = _prefix_layers(data, meta, prefix)
    try:
        tensors = unpack(data, device)
        n_layers = int(meta["n_layers"])
        if front is None:
            layers = tuple(_layer(tensors, i, dtype, scheme, group_size) for i in range(n_layers))
        else:
            layers = _context_layers(tensors, n_layers, dtype, (scheme, group_size), front, meta)
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


def _prefix_layers(
    data: ByteSource, meta: dict[str, str], prefix: CompressedContext | None
) -> list[RaggedLayer | None] | None:
    """Per layer, the rows to put in front (None: no prefix); None for an object that
    stores every row (versions 1 and 2). `prefix` is checked to be the object's own."""
    ids = prefix_ids(data)
    if ids is None:
        return None
    n_layers = int(meta["n_layers"])
    if not ids:
        return [None] * n_layers
    if prefix is None:
        raise ValueError("a version 3 or 4 object needs prefix= (KVzipEngine.prefix_context)")
    if prefix.context_ids.tolist() != ids or len(prefix.layers) != n_layers:
        raise ValueError("prefix= is not the prefix this object was made with")
    return list(prefix.layers)


def _context_layers(
    tensors: dict[str, torch.Tensor],
    n_layers: int,
    dtype: torch.dtype | None,
    quantized: tuple[str, int],
    front: list[RaggedLayer | None],
    meta: dict[str, str],
) -> tuple[RaggedLayer, ...]:
    """Version 3 or 4 layers (`tensors` on the target device): the kept masks of every
    layer checked and the merged rows' positions, scores and offsets laid out for all
    layers at once (shared_prefix.plan_merge, one device synchronisation), then per layer
    one dequantization and the copies of its rows into place."""
    scheme, group_size = quantized
    centred = meta["format_version"] == CENTRED_FP8_VERSION
    kept, lens = shared_prefix.unpack_layers(
        [tensors[f"layers.{i}.kept"] for i in range(n_layers)], int(meta["context_len"])
    )
    s = 0 if not lens or front[0] is None else front[0].keys.shape[0] // max(len(lens[0]), 1)
    scores = [tensors[f"layers.{i}.scores"] for i in range(n_layers)]
    plan = shared_prefix.plan_merge(kept, lens, s, scores)
    assert dtype is not None  # quantized: the dtype quantized from at the latest
    layers = []
    for i in range(n_layers):
        if not centred and any(f"layers.{i}.{f}_mean" in tensors for f in ("keys", "values")):
            raise CorruptContextError(
                f"stored context layer {i} holds means that format version 3 does not have"
            )
        stored = {n: tensors[f"layers.{i}.{n}"] for n in quantization.stored_names(scheme, centred)}
        quantization.check_shapes(stored, plan.context_bounds(i), scheme, group_size, layer=i)
        keys, values = quantization.dequantize(stored, plan.ctx_cu[i], scheme, group_size, dtype)
        layers.append(shared_prefix.merged_layer(plan, i, front[i], keys, values))
    return tuple(layers)


def _layer(
    tensors: dict[str, torch.Tensor],
    i: int,
    dtype: torch.dtype | None,
    scheme: str,
    group_size: int,
) -> RaggedLayer:
    """A version 1 or 2 layer: every row stored."""
    parts = {f: tensors[f"layers.{i}.{f}"] for f in _FIELDS}
    if scheme != "none":  # compact side data of version 2: back to the resident dtypes
        parts["scores"] = parts["scores"].float()
        parts["positions"] = parts["positions"].to(torch.int32)
    stored = {n: tensors[f"layers.{i}.{n}"] for n in quantization.stored_names(scheme)}
    quantization.check_shapes(stored, parts["cu_lens"].tolist(), scheme, group_size, layer=i)
    if dtype is None:
        keys, values = stored["keys"], stored["values"]
    else:
        keys, values = quantization.dequantize(stored, parts["cu_lens"], scheme, group_size, dtype)
    return RaggedLayer(keys=keys, values=values, **parts)
