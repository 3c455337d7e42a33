"""Forward pre-hooks that hand each attention module's input to a callback.

The input of layer l's attention module is the hidden state after the layer's input
layernorm, the very tensor KVzap predictors read. Nothing is copied unless the callback
keeps it; the hooks are removed when the block ends, also on an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

OnInput = Callable[[int, torch.Tensor], None]
"""callback(layer_idx, hidden (B, T, D))."""


@contextmanager
def attention_inputs(model: torch.nn.Module, callback: OnInput) -> Iterator[None]:
    """Call `callback(layer, hidden)` before every attention module runs, while active."""
    from service.compression.scorers.kvzip_plus import (
        attention_modules,  # service.compression.scorers imports us
    )

    def hook(idx: int):  # type: ignore[no-untyped-def]
        def before(module, args, kwargs):  # type: ignore[no-untyped-def]
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            callback(idx, hidden)

        return before

    modules = attention_modules(model)
    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
