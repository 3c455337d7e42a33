"""Fingerprints of the model and tokenizer (what a stored context must match; DESIGN.md).

Never Python's `hash()`: every id is a sha256 over a canonical JSON encoding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

FORMAT_VERSION = "1"
_SAMPLE = 4096
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "_model_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "_attn_implementation",
}


@dataclass(frozen=True)
class ModelIdentity:
    """What a stored context must match to be loaded by this engine."""

    name: str
    model_fingerprint: str
    tokenizer_fingerprint: str


def _sha(payload: object) -> str:
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    """sha256 of an evenly strided sample of at most _SAMPLE elements (fp32 bytes)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step][:_SAMPLE].float().cpu().contiguous()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()


def model_fingerprint(model: PreTrainedModel) -> str:
    """Config (minus volatile keys) + name, shape and a sampled digest of every weight."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    weights = [
        (name, list(p.shape), _tensor_digest(p)) for name, p in sorted(model.state_dict().items())
    ]
    return _sha({"config": config, "weights": weights})


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Vocabulary, special tokens and chat template."""
    vocab = sorted(tokenizer.get_vocab().items())
    return _sha(
        {
            "vocab": vocab,
            "special": tokenizer.special_tokens_map,
            "template": tokenizer.chat_template,
        }
    )
