"""The context id: one torch-free function for both modes, and the ids of older versions."""

from __future__ import annotations

import hashlib
import json

import torch

from service.config import CompressionConfig
from service.serving.ids import context_id, legacy_context_id

IDENTITY = {
    "model": "tiny",
    "model_fingerprint": "m" * 64,
    "tokenizer_fingerprint": "t" * 64,
    "format_version": "1",
}
BASE = dict(compression=CompressionConfig(), tenant="", system=None, text="doc")


def test_ids_hash_the_model_the_settings_the_tenant_the_system_and_the_text() -> None:
    first = context_id(IDENTITY, **BASE)  # type: ignore[arg-type]
    assert first == context_id(IDENTITY, **BASE)  # type: ignore[arg-type]
    assert first.startswith("ctx_") and len(first) == 36
    variants = [
        context_id({**IDENTITY, "model_fingerprint": "x" * 64}, **BASE),  # type: ignore[arg-type]
        context_id({**IDENTITY, "tokenizer_fingerprint": "x" * 64}, **BASE),  # type: ignore[arg-type]
        context_id({**IDENTITY, "format_version": "2"}, **BASE),  # type: ignore[arg-type]
        context_id(IDENTITY, **{**BASE, "tenant": "acme"}),  # type: ignore[arg-type]
        context_id(IDENTITY, **{**BASE, "system": "Be brief."}),  # type: ignore[arg-type]
        context_id(IDENTITY, **{**BASE, "text": "doc!"}),  # type: ignore[arg-type]
        context_id(IDENTITY, **{**BASE, "compression": CompressionConfig(ratio=0.2)}),  # type: ignore[arg-type]
        context_id(IDENTITY, **{**BASE, "compression": CompressionConfig(chunk_size=64)}),  # type: ignore[arg-type]
        context_id(  # type: ignore[arg-type]
            IDENTITY, **{**BASE, "compression": CompressionConfig("kvzap", 1.0, threshold=-4.0)}
        ),
        context_id(  # type: ignore[arg-type]
            IDENTITY, **{**BASE, "compression": CompressionConfig("kvzap", 1.0, threshold=-5.0)}
        ),
    ]
    assert len({first, *variants}) == 1 + len(variants)


def test_the_id_is_the_one_distributed_mode_gave_before() -> None:
    """Distributed ids are unchanged by the move (the formula of redis_records before 0.2)."""
    payload = {
        "format": "1",
        "model": "m" * 64,
        "tokenizer": "t" * 64,
        "compression": {"method": "kvzip", "ratio": 0.3, "chunk_size": 2000, "threshold": None},
        "tenant": "",
        "system": None,
        "text": hashlib.sha256(b"doc").hexdigest(),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert (
        context_id(IDENTITY, **BASE) == "ctx_" + hashlib.sha256(canonical.encode()).hexdigest()[:32]
    )  # type: ignore[arg-type]


def _embedded_id_before_0_2(
    compression: CompressionConfig, token_ids: list[int], tenant: str
) -> str:
    """The embedded id as service/identity.py computed it (token ids through torch)."""
    settings: list[object] = [
        compression.method,
        round(compression.ratio, 6),
        compression.chunk_size,
    ]
    if compression.threshold is not None:
        settings.append(round(compression.threshold, 6))
    tokens = torch.tensor(token_ids, dtype=torch.int32).numpy().tobytes()
    payload = {
        "format": "1",
        "model": "m" * 64,
        "tokenizer": "t" * 64,
        "compression": settings,
        "tenant": tenant,
        "tokens": hashlib.sha256(tokens).hexdigest(),
    }
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return "ctx_" + hashlib.sha256(data.encode()).hexdigest()[:32]


def test_the_legacy_embedded_id_matches_the_previous_code() -> None:
    ids = [1, 50_000, 7, 0, 2**31 - 1]
    for compression, tenant in [
        (CompressionConfig(), ""),
        (CompressionConfig("kvzip", 0.5, 64), "acme"),
        (CompressionConfig("kvzap", 1.0, threshold=-4.0), ""),
    ]:
        want = _embedded_id_before_0_2(compression, ids, tenant)
        assert legacy_context_id(IDENTITY, compression, ids, tenant) == want
