"""The context id: one torch-free function, the same in every mode (DESIGN.md, "Keys").

    ctx_ + 32 hex digits of sha256 over a canonical JSON of what makes two contexts
    interchangeable: the stored format version, the model and tokenizer/template
    fingerprints, the compression settings, the tenant, the system instruction and the
    sha256 of the document text.

The text (not its token ids) is hashed, so an API process without a tokenizer computes the
same id as a worker or the embedded service. Never Python's `hash()`.

`legacy_context_id` is the id the embedded service gave before version 0.2 (it hashed the
token ids of prefix + document); registrations look it up too, so contexts stored by that
code keep their ids after an upgrade.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import asdict

from service.config import CompressionConfig

IDENTITY_KEYS = ("model", "model_fingerprint", "tokenizer_fingerprint", "format_version")
"""What a served model is known by (a worker's heartbeat carries exactly these)."""


def _digest(payload: object) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "ctx_" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def context_id(
    identity: Mapping[str, str],
    compression: CompressionConfig,
    tenant: str,
    system: str | None,
    text: str,
) -> str:
    """The id of `text` registered by `tenant` with `compression` (already normalised)."""
    return _digest(
        {
            "format": identity["format_version"],
            "model": identity["model_fingerprint"],
            "tokenizer": identity["tokenizer_fingerprint"],
            "compression": _settings(compression),
            "tenant": tenant,
            "system": system,
            "text": hashlib.sha256(text.encode()).hexdigest(),
        }
    )


def _settings(compression: CompressionConfig) -> dict[str, object]:
    """The hashed compression settings: quantization and group_size only when quantized,
    so the ids of unquantized contexts are those of versions before quantization."""
    settings = {**asdict(compression), "ratio": round(compression.ratio, 6)}
    if compression.quantization == "none":
        del settings["quantization"], settings["group_size"]
    return settings


def legacy_context_id(
    identity: Mapping[str, str],
    compression: CompressionConfig,
    token_ids: list[int],
    tenant: str,
) -> str:
    """The embedded id of versions before 0.2: token ids (prefix + document) as int32."""
    settings: list[object] = [
        compression.method,
        round(compression.ratio, 6),
        compression.chunk_size,
    ]
    if compression.threshold is not None:
        settings.append(round(compression.threshold, 6))
    if compression.quantization != "none":  # never stored before 0.2: an id of its own
        settings += [compression.quantization, compression.group_size]
    tokens = struct.pack(f"<{len(token_ids)}i", *token_ids)  # int32, little-endian
    payload = {
        "format": identity["format_version"],
        "model": identity["model_fingerprint"],
        "tokenizer": identity["tokenizer_fingerprint"],
        "compression": settings,
        "tenant": tenant,
        "tokens": hashlib.sha256(tokens).hexdigest(),
    }
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return "ctx_" + hashlib.sha256(data.encode()).hexdigest()[:32]
