"""Load NVIDIA's released KVzap checkpoints (nvidia/KVzap-{linear,mlp}-<model>) from disk.

Such a checkpoint is a Hugging Face `save_pretrained` folder of kvpress's `KVzapModel`:

    config.json        {"model_type": "kvzap", "input_dim": D, "output_dim": H,
                        "hidden_dim": F or null, "n_modules": L, ...}
    model.safetensors  one module per layer: `layers.{l}.weight|bias` (Linear), or
                       `layers.{l}.0.weight|bias` + `layers.{l}.2.weight|bias`
                       (Linear-GELU-Linear); early versions named the list `module_list`
                       (or model.safetensors.index.json + shards)

Nothing is downloaded and no remote code runs: only the JSON config and the safetensors
tensors are read. The result is a `KVzapPredictor` (fp32) whose metadata records where it
came from; `kvzip calibrate-scorer --released DIR` stores it for the running model after
checking its shapes against that model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from service.compression.learned.predictor import KVzapPredictor, from_state_dict
from service.errors import InvalidInputError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS).exists():
        return load_file(str(folder / WEIGHTS))
    if (folder / INDEX).exists():
        shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise InvalidInputError(f"{folder} holds no {WEIGHTS} (nor {INDEX})")


def load_released(directory: Path | str) -> KVzapPredictor:
    """The predictor in a released KVzap checkpoint folder (see the module docstring).

    InvalidInputError when the folder is not one, or its tensors disagree with its config.
    """
    folder = Path(directory)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if config.get("model_type") != "kvzap":
            raise InvalidInputError(f"{folder}/config.json is not a KVzap config")
        state = {k: v.float() for k, v in _tensors(folder).items()}
        predictor = from_state_dict(state)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise InvalidInputError(f"cannot read a KVzap checkpoint in {folder}: {exc}") from exc
    expected = (
        config.get("n_modules"),
        config.get("input_dim"),
        config.get("output_dim"),
        config.get("hidden_dim"),
    )
    got = (predictor.n_layers, predictor.input_dim, predictor.output_dim, predictor.hidden_dim)
    if expected != got:
        raise InvalidInputError(
            f"{folder}: config says (layers, in, out, hidden) = {expected}, tensors are {got}"
        )
    return predictor.with_meta(source=f"released checkpoint {folder.name}")
