"""Helpers for the kvzap tests: a predictor stored for an engine without calibrating."""

from __future__ import annotations

import torch

from service.compression.learned.predictor import KVzapPredictor, predictor_path, save_predictor
from service.compression.scorers.kvzap import predictor_dir


def random_predictor(
    n_layers: int, d: int, h: int, kind: str = "linear", hidden: int = 8, seed: int = 0
) -> KVzapPredictor:
    """Random weights of the given shapes (scale ~1 outputs for unit-scale inputs)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    if kind == "linear":
        return KVzapPredictor("linear", rand(n_layers, h, d), rand(n_layers, h) - 3.0)
    return KVzapPredictor(
        "mlp", rand(n_layers, hidden, d), rand(n_layers, hidden), rand(n_layers, h, hidden),
        rand(n_layers, h) - 3.0,
    )  # fmt: skip


def store_test_predictor(engine, kind: str = "linear", seed: int = 0) -> KVzapPredictor:  # type: ignore[no-untyped-def]
    """Save a random `kind` predictor for `engine`'s model where method kvzap looks."""
    config = engine.model.config
    predictor = random_predictor(
        engine.n_layers, config.hidden_size, config.num_key_value_heads, kind, seed=seed
    ).with_meta(model=engine.identity.name, model_fingerprint=engine.identity.model_fingerprint)
    save_predictor(predictor_path(predictor_dir(engine), engine.identity, kind), predictor)
    return predictor
