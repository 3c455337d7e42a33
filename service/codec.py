"""Safetensors codec of a CompressedContext (DESIGN.md, "Storage format").

Tensors: layers.{l}.keys / values (N_l, d) in the KV dtype, layers.{l}.cu_lens int32 (H+1),
layers.{l}.scores fp32 (N_l), layers.{l}.positions int32 (N_l), context_ids int32.
`__metadata__` (strings): format_version, model, model_fingerprint, tokenizer_fingerprint,
dtype, prefix_len, context_len, n_layers, method, ratio, chunk_size, created_at.
Never pickle: decoding is safetensors only and refuses foreign or broken objects.
"""

from __future__ import annotations

import json
import struct

import torch

from service.engine.fingerprints import FORMAT_VERSION, ModelIdentity
from service.engine.kvcache import CompressedContext, RaggedLayer
from service.engine.tensor_blob import ByteSource, pack, unpack
from service.errors import CorruptContextError, IncompatibleContextError

_FIELDS = ("keys", "values", "cu_lens", "scores", "positions")


def encode(context: CompressedContext, identity: ModelIdentity) -> bytes:
    """CompressedContext -> safetensors bytes (tensors copied to the CPU)."""
    tensors = {"context_ids": context.context_ids.to(torch.int32)}
    for i, layer in enumerate(context.layers):
        for field in _FIELDS:
            tensors[f"layers.{i}.{field}"] = getattr(layer, field)
    return pack(tensors, _metadata(context, identity))


def _metadata(context: CompressedContext, identity: ModelIdentity) -> dict[str, str]:
    return {
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


def read_metadata(data: ByteSource) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob; CorruptContextError when it does not parse."""
    try:
        view = memoryview(data).cast("B")
        (size,) = struct.unpack("<Q", view[:8])
        header = json.loads(bytes(view[8 : 8 + size]))
        meta = header["__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise CorruptContextError(f"stored context does not parse as safetensors: {exc}") from exc
    if not isinstance(meta, dict):
        raise CorruptContextError("stored context has no metadata")
    return meta


def check_compatible(meta: dict[str, str], identity: ModelIdentity) -> None:
    """Raise IncompatibleContextError unless format, model and tokenizer all match."""
    expected = {
        "format_version": FORMAT_VERSION,
        "model_fingerprint": identity.model_fingerprint,
        "tokenizer_fingerprint": identity.tokenizer_fingerprint,
    }
    for key, want in expected.items():
        if meta.get(key) != want:
            raise IncompatibleContextError(
                f"stored context was made with a different {key.replace('_', ' ')} "
                f"({meta.get(key)!r}, running {want!r}); register the document again"
            )


def decode(
    data: ByteSource,
    identity: ModelIdentity,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> CompressedContext:
    """safetensors bytes (any bytes-like object, e.g. an mmap view) -> CompressedContext on
    `device` (keys/values cast to `dtype`)."""
    meta = read_metadata(data)
    check_compatible(meta, identity)
    try:
        tensors = unpack(data, device)
        layers = tuple(_layer(tensors, i, device, dtype) for i in range(int(meta["n_layers"])))
        return CompressedContext(
            layers=layers,
            context_ids=tensors["context_ids"].to(device),
            prefix_len=int(meta["prefix_len"]),
            method=meta["method"],
            ratio=float(meta["ratio"]),
            chunk_size=int(meta["chunk_size"]),
            created_at=float(meta["created_at"]),
        )
    except (KeyError, ValueError, RuntimeError, TypeError, struct.error) as exc:
        raise CorruptContextError(f"stored context is incomplete or broken: {exc}") from exc


def _layer(
    tensors: dict[str, torch.Tensor], i: int, device: torch.device | str, dtype: torch.dtype | None
) -> RaggedLayer:
    parts = {f: tensors[f"layers.{i}.{f}"].to(device) for f in _FIELDS}
    if dtype is not None:
        parts["keys"], parts["values"] = parts["keys"].to(dtype), parts["values"].to(dtype)
    if int(parts["cu_lens"][-1]) != parts["keys"].shape[0]:
        raise CorruptContextError(f"layer {i}: cu_lens does not match the number of keys")
    return RaggedLayer(**parts)
