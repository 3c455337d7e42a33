"""Forward passes and the single-row decode loop: forward, prefill, generate (token ids only).

Sampling is `service.engine.sampler.sample`, shared with the batched decoder."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from service.engine.kvcache import KVzipCache
from service.engine.sampler import RowSampling, sample
from service.types import SamplingParams


@functools.cache
def _cache_kwarg_for(model_type: Any) -> str:
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_kwarg(model: PreTrainedModel) -> str:
    """transformers >= 5.24 calls the cache argument `cache`; older 5.x `past_key_values`."""
    model_type: Any = type(model)
    return _cache_kwarg_for(model_type)


@torch.inference_mode()
def forward(
    model: PreTrainedModel, ids: Sequence[int], start: int, cache: KVzipCache
) -> torch.Tensor:
    """Run `ids` at positions start, start+1, ... through the model; returns last logits (V,)."""
    device = model.device
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
    positions = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
    kwargs = {_cache_kwarg(model): cache}
    out = model(
        input_ids=input_ids,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        kvzip_cache=cache,
        **kwargs,
    )
    logits: torch.Tensor = out.logits[0, -1].float()
    return logits


@torch.inference_mode()
def step_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVzipCache
) -> torch.Tensor:
    """input_ids, positions (B, T) -> last-position logits (B, V) fp32. No host sync."""
    return _raw_step(model, input_ids, positions, cache, _cache_kwarg(model))


@torch.inference_mode()
def rows_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    cache: KVzipCache,
    last: torch.Tensor,
) -> torch.Tensor:
    """input_ids, positions (B, T), right-padded rows whose last real token is at `last`
    (B,) -> the logits there (B, V) fp32 (the LM head runs only at those positions)."""
    keep, where = torch.unique(last, return_inverse=True)
    out = model(
        input_ids=input_ids,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=keep,
        kvzip_cache=cache,
        **{_cache_kwarg(model): cache},
    )
    rows = torch.arange(len(last), device=last.device)
    logits: torch.Tensor = out.logits[rows, where].float()
    return logits


def _raw_step(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    cache: KVzipCache,
    cache_kwarg: str,
) -> torch.Tensor:
    """`step_logits` without its inference-mode decorator (the caller holds the mode)."""
    out = model(
        input_ids=input_ids,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        kvzip_cache=cache,
        **{cache_kwarg: cache},
    )
    logits: torch.Tensor = out.logits[:, -1].float()
    return logits


@functools.cache
def _compiled() -> Any:
    """`_raw_step` through torch.compile (Inductor fuses the norms, RoPE, activations and
    residual adds that otherwise cost one small kernel each; no CUDA graphs of its own: the
    caller captures the compiled step in its graph). dynamic=True: one compilation serves
    every batch size, tail capacity and context length."""
    return torch.compile(_raw_step, dynamic=True, fullgraph=False)


def compiled_step_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVzipCache
) -> torch.Tensor:
    """`step_logits` through torch.compile: (B, T) ids/positions -> (B, V) fp32 logits."""
    logits: torch.Tensor = _compiled()(model, input_ids, positions, cache, _cache_kwarg(model))
    return logits


def prefill(
    model: PreTrainedModel, ids: Sequence[int], cache: KVzipCache, piece: int
) -> torch.Tensor:
    """Prefill `ids` into the cache tail in pieces of at most `piece` tokens."""
    start = cache.get_seq_length()
    logits = torch.empty(0)
    for offset in range(0, len(ids), piece):
        logits = forward(model, ids[offset : offset + piece], start + offset, cache)
    return logits


def generate(
    model: PreTrainedModel,
    cache: KVzipCache,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    eos_ids: set[int],
) -> Iterator[int]:
    """Yield answer token ids after `prompt_ids`, stopping at EOS or max_new_tokens."""
    row = [RowSampling.from_params(params)]
    position = cache.get_seq_length()
    logits = forward(model, prompt_ids, position, cache)
    position += len(prompt_ids)
    for _ in range(params.max_new_tokens):
        token = int(sample(logits[None], row)[0])  # logits (V,) -> a batch of one
        if token in eos_ids:
            return
        yield token
        logits = forward(model, [token], position, cache)
        position += 1
