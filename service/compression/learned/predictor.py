"""The KVzap predictor: per layer, attention-input hidden state -> a KVzip score per KV head.

Two kinds (KVZIP.md, "Fast learned scorer"):

    linear  y = W x + b                               W (H, D)
    mlp     y = W2 gelu(W1 x + b1) + b2               W1 (F, D), W2 (H, F), F = 512 by default

x (T, D) is what layer l's attention module receives (after the input layernorm), y (T, H)
the predicted score of each of the T tokens' KV pairs in each of the H KV heads, on the
scale of the fit's target (metadata `target`: rank-normal or log scores).

The weights are stored exactly as NVIDIA's released KVzap checkpoints name them (one
`torch.nn.Linear`, or `Sequential(Linear, GELU, Linear)`, per layer):

    linear  layers.{l}.weight (H, D), layers.{l}.bias (H,)
    mlp     layers.{l}.0.weight (F, D), layers.{l}.0.bias (F,),
            layers.{l}.2.weight (H, F), layers.{l}.2.bias (H,)

Our own files are one safetensors object with that layout plus string `__metadata__`
(see META_KEYS): the model fingerprint it was fitted for, its kind, its training loss and
held-out R². Never pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from service.engine.fingerprints import ModelIdentity
from service.errors import InvalidInputError

KINDS = ("linear", "mlp")
FORMAT = "kvzap-predictor/1"
META_KEYS = (
    "format",
    "kind",
    "model",
    "model_fingerprint",
    "n_layers",
    "input_dim",
    "output_dim",
    "hidden_dim",
    "target",
    "target_method",
    "target_transform",
    "window",
    "train_loss",
    "heldout_r2",
    "heldout_spearman",
    "heldout_top30_recall",
    "source",
)


@dataclass(frozen=True)
class KVzapPredictor:
    """Per-layer weights stacked over layers (every layer has the same shapes).

    w1 (L, O, D), b1 (L, O): the whole linear map (O = H), or the MLP's first layer
    (O = F); w2 (L, H, F), b2 (L, H): the MLP's second layer (None for `linear`).
    meta: string metadata (META_KEYS and any extra keys).
    """

    kind: str
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if (self.kind == "mlp") != (self.w2 is not None and self.b2 is not None):
            raise ValueError("an mlp predictor has w2/b2, a linear one has not")

    @property
    def n_layers(self) -> int:
        return int(self.w1.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.w1.shape[2])

    @property
    def output_dim(self) -> int:
        """H: one log-score per KV head."""
        return int(self.b1.shape[1] if self.b2 is None else self.b2.shape[1])

    @property
    def hidden_dim(self) -> int | None:
        return None if self.w2 is None else int(self.w2.shape[2])

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x (T, D) attention input of layer `layer` -> (T, H) predicted log-scores."""
        x = x.to(self.w1.dtype)
        y = F.linear(x, self.w1[layer], self.b1[layer])
        if self.w2 is not None and self.b2 is not None:
            y = F.linear(F.gelu(y), self.w2[layer], self.b2[layer])
        return y

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> KVzapPredictor:
        """The same predictor with its weights on `device` (and in `dtype`)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        w1, b1 = move(self.w1), move(self.b1)
        assert w1 is not None and b1 is not None
        return replace(self, w1=w1, b1=b1, w2=move(self.w2), b2=move(self.b2))

    def with_meta(self, **meta: object) -> KVzapPredictor:
        """A copy whose metadata has these keys added or replaced (values as strings)."""
        return replace(self, meta={**self.meta, **{k: _text(v) for k, v in meta.items()}})

    def state_dict(self, prefix: str = "layers") -> dict[str, torch.Tensor]:
        """The released KVzap tensor names (see the module docstring) -> contiguous tensors."""
        out: dict[str, torch.Tensor] = {}
        for i in range(self.n_layers):
            if self.w2 is None or self.b2 is None:
                out[f"{prefix}.{i}.weight"] = self.w1[i]
                out[f"{prefix}.{i}.bias"] = self.b1[i]
            else:
                out[f"{prefix}.{i}.0.weight"] = self.w1[i]
                out[f"{prefix}.{i}.0.bias"] = self.b1[i]
                out[f"{prefix}.{i}.2.weight"] = self.w2[i]
                out[f"{prefix}.{i}.2.bias"] = self.b2[i]
        return {k: v.detach().contiguous() for k, v in out.items()}


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def from_state_dict(
    state: dict[str, torch.Tensor], meta: dict[str, str] | None = None
) -> KVzapPredictor:
    """Build a predictor from released-layout tensors (prefix `layers.` or `module_list.`).

    The kind follows from the names: `{prefix}.{l}.weight` is linear, `{prefix}.{l}.0.weight`
    an MLP. Raises ValueError on anything else (missing layers, mixed kinds, bad shapes).
    """
    prefixes = {name.split(".", 1)[0] for name in state}
    if len(prefixes) != 1 or not prefixes <= {"layers", "module_list"}:
        raise ValueError(f"unexpected tensor names {sorted(state)[:4]}...")
    prefix = prefixes.pop()
    n_layers = 1 + max(int(name.split(".")[1]) for name in state)
    kind = "mlp" if f"{prefix}.0.0.weight" in state else "linear"
    parts = ("0.weight", "0.bias", "2.weight", "2.bias") if kind == "mlp" else ("weight", "bias")
    expected = {f"{prefix}.{i}.{p}" for i in range(n_layers) for p in parts}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{kind} checkpoint: missing {missing[:4]}, unexpected {extra[:4]}")

    def stack(part: str) -> torch.Tensor:
        return torch.stack([state[f"{prefix}.{i}.{part}"] for i in range(n_layers)])

    if kind == "linear":
        predictor = KVzapPredictor("linear", stack("weight"), stack("bias"), meta=meta or {})
    else:
        predictor = KVzapPredictor(
            "mlp",
            stack("0.weight"),
            stack("0.bias"),
            stack("2.weight"),
            stack("2.bias"),
            meta=meta or {},
        )
    _check_shapes(predictor)
    return predictor


def _check_shapes(p: KVzapPredictor) -> None:
    l_, o, d = p.w1.shape
    ok = p.b1.shape == (l_, o)
    if p.w2 is not None and p.b2 is not None:
        ok = ok and p.w2.shape[:2] == (l_, p.b2.shape[1]) and p.w2.shape[2] == o
        ok = ok and p.b2.shape == (l_, p.w2.shape[1])
    if not ok:
        raise ValueError(f"inconsistent predictor shapes: w1 {tuple(p.w1.shape)}")


def check_fits(predictor: KVzapPredictor, n_layers: int, hidden_size: int, kv_heads: int) -> None:
    """InvalidInputError unless the predictor has one module per layer, D in, H out."""
    got = (predictor.n_layers, predictor.input_dim, predictor.output_dim)
    if got != (n_layers, hidden_size, kv_heads):
        raise InvalidInputError(
            f"the KVzap predictor has (layers, input dim, KV heads) = {got}; this model "
            f"needs {(n_layers, hidden_size, kv_heads)}"
        )


# --- the service's store: <dir>/<model fingerprint>.<kind>.safetensors --------------------


def predictor_path(directory: Path, identity: ModelIdentity, kind: str) -> Path:
    """Where the `kind` predictor of this model lives: keyed by its weights/config fingerprint."""
    return Path(directory) / f"{identity.model_fingerprint[:32]}.{kind}.safetensors"


def save_predictor(path: Path, predictor: KVzapPredictor) -> Path:
    """Write `predictor` (tensors + metadata) to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "kind": predictor.kind,
        "n_layers": str(predictor.n_layers),
        "input_dim": str(predictor.input_dim),
        "output_dim": str(predictor.output_dim),
        "hidden_dim": str(predictor.hidden_dim or ""),
        **predictor.meta,
    }
    tmp = path.with_suffix(".tmp")
    save_file(predictor.state_dict(), str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_predictor_file(path: Path) -> KVzapPredictor:
    """Read a predictor written by `save_predictor` (InvalidInputError if it is not one)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise InvalidInputError(f"{path} is not a KVzap predictor ({meta.get('format')!r})")
        predictor = from_state_dict(load_file(str(path)), meta)
    except (OSError, ValueError, SafetensorError) as exc:
        raise InvalidInputError(f"cannot read the KVzap predictor {path}: {exc}") from exc
    if predictor.kind != meta.get("kind"):
        raise InvalidInputError(f"{path}: metadata says {meta.get('kind')}, tensors are not")
    return predictor


def load_predictor(
    directory: Path, identity: ModelIdentity, kind: str | None = None
) -> KVzapPredictor:
    """The stored predictor of this model: `kind`, or the MLP when there is one, else linear.

    InvalidInputError when the model has none (it was never calibrated) or the file was
    fitted for another model.
    """
    path = stored_predictor_path(directory, identity, kind)
    predictor = load_predictor_file(path)
    if predictor.meta.get("model_fingerprint") != identity.model_fingerprint:
        raise InvalidInputError(f"{path} was fitted for another model")
    return predictor


def stored_predictor_path(directory: Path, identity: ModelIdentity, kind: str | None) -> Path:
    """The file `load_predictor` reads (`kind`, or the MLP when there is one, else linear),
    found without reading it; InvalidInputError when the model was never calibrated."""
    kinds = (kind,) if kind else ("mlp", "linear")
    for k in kinds:
        path = predictor_path(directory, identity, k)
        if path.exists():
            return path
    raise InvalidInputError(
        f"method kvzap needs a {kind or 'KVzap'} predictor for model {identity.name!r}: run "
        f"`kvzip calibrate-scorer` once (expected {predictor_path(directory, identity, kinds[0])})"
    )
