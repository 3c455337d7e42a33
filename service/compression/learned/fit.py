"""Fitting KVzap predictors: ridge regression (closed form) and a 2-layer GELU MLP (AdamW).

Both take the samples of every layer at once:

    x (N, L, D)  attention-input hidden states of N sampled tokens in each of the L layers
    y (N, L, H)  their log KVzip+ scores in each KV head

and return a `KVzapPredictor` in raw units (no normalisation left to apply at ingest).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.compression.learned.predictor import KVzapPredictor

RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Ridge strengths tried, relative to the mean eigenvalue of the centred Gram matrix."""

Tick = Callable[[int], None]


def r2_score(y: torch.Tensor, pred: torch.Tensor) -> float:
    """Pooled R² over every layer and head: 1 - SSE / SST, SST around each output's mean.

    y, pred (N, L, H) (or (N, K)).
    """
    y64, p64 = y.double(), pred.double()
    sse = (y64 - p64).pow(2).sum()
    sst = (y64 - y64.mean(dim=0, keepdim=True)).pow(2).sum()
    return float(1.0 - sse / sst) if sst > 0 else float("nan")


def r2_per_layer(y: torch.Tensor, pred: torch.Tensor) -> list[float]:
    """R² of each layer (heads pooled): y, pred (N, L, H) -> L floats."""
    return [r2_score(y[:, i], pred[:, i]) for i in range(y.shape[1])]


def predict_all(predictor: KVzapPredictor, x: torch.Tensor) -> torch.Tensor:
    """x (N, L, D) -> (N, L, H) predictions of every layer."""
    p = predictor.to(x.device, torch.float32)
    return torch.stack([p.predict(i, x[:, i].float()) for i in range(p.n_layers)], dim=1)


# --- ridge --------------------------------------------------------------------------------


def _ridge_layer(
    x: torch.Tensor, y: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed form on centred data: W = (Xc'Xc + a I)^-1 Xc'Yc, b = mean(y) - W mean(x).

    x (N, D), y (N, H) float64; alpha relative to the mean eigenvalue of Xc'Xc.
    Returns W (H, D), b (H,), and the eigenvalues used (for the record).
    """
    mx, my = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    evals, evecs = torch.linalg.eigh(gram)
    lam = alpha * float(evals.clamp_min(0).mean())
    coef = evecs @ ((evecs.T @ (xc.T @ yc)) / (evals.clamp_min(0) + lam).unsqueeze(1))  # (D, H)
    return coef.T, my - mx @ coef, evals


def fit_ridge(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float | None = None,
    validation: float = 0.1,
    tick: Tick | None = None,
) -> KVzapPredictor:
    """Per-layer ridge regression x (N, L, D) -> y (N, L, H), fp32 weights.

    alpha None: each layer picks its strength from RIDGE_ALPHAS on the last `validation`
    fraction of the samples (callers pass samples grouped by text, so that is held-out
    text), then refits on all of them.
    """
    n, n_layers = x.shape[0], x.shape[1]
    cut = n - max(1, int(n * validation)) if alpha is None else n
    ws, bs, chosen = [], [], []
    for i in range(n_layers):
        xi, yi = x[:, i].double(), y[:, i].double()
        best = alpha
        if best is None:
            errors = []
            for a in RIDGE_ALPHAS:
                w, b, _ = _ridge_layer(xi[:cut], yi[:cut], a)
                errors.append(float((xi[cut:] @ w.T + b - yi[cut:]).pow(2).mean()))
            best = RIDGE_ALPHAS[min(range(len(errors)), key=errors.__getitem__)]
        w, b, _ = _ridge_layer(xi, yi, best)
        ws.append(w.float())
        bs.append(b.float())
        chosen.append(best)
        if tick:
            tick(1)
    return KVzapPredictor("linear", torch.stack(ws), torch.stack(bs), meta={"alphas": str(chosen)})


# --- MLP ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPSettings:
    """Training settings of the 2-layer MLP (KVzap's recipe: hidden 512, AdamW, cosine)."""

    hidden: int = 512
    epochs: int = 15
    lr: float = 2e-3
    weight_decay: float = 0.01
    batch: int = 512
    validation: float = 0.1  # last fraction of the samples: early-stopping set
    clip: float = 1.0
    seed: int = 0


def _init(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """torch.nn.Linear's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


def _forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """All layers at once: x (L, B, D) -> (L, B, H)."""
    w1, b1, w2, b2 = params
    hidden = F.gelu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
    return torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))


def fit_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    settings: MLPSettings | None = None,
    tick: Tick | None = None,
) -> KVzapPredictor:
    """Per-layer MLP x (N, L, D) -> y (N, L, H), trained with MSE on standardised data.

    Every layer trains at once (batched matmuls). Each layer keeps the weights of its
    epoch with the lowest loss on the validation tail; the input/output standardisation is
    folded into the first/last layer so the result applies to raw hidden states.
    """
    s = settings or MLPSettings()
    gen = torch.Generator().manual_seed(s.seed)
    n, n_layers, d = x.shape
    h = y.shape[2]
    cut = n - max(1, int(n * s.validation))
    xs, ys = x.float().transpose(0, 1), y.float().transpose(0, 1)  # (L, N, .)
    mx, sx = xs[:, :cut].mean(dim=1, keepdim=True), xs[:, :cut].std(dim=1, keepdim=True)
    my, sy = ys[:, :cut].mean(dim=1, keepdim=True), ys[:, :cut].std(dim=1, keepdim=True)
    sx, sy = sx.clamp_min(1e-6), sy.clamp_min(1e-6)
    xn, yn = (xs - mx) / sx, (ys - my) / sy
    device = x.device
    params = [
        _init((n_layers, s.hidden, d), d, gen),
        _init((n_layers, s.hidden), d, gen),
        _init((n_layers, h, s.hidden), s.hidden, gen),
        _init((n_layers, h), s.hidden, gen),
    ]
    params = [p.to(device).requires_grad_() for p in params]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    steps = s.epochs * math.ceil(cut / s.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    best = [p.detach().clone() for p in params]
    best_val = torch.full((n_layers,), float("inf"), device=device)
    for _ in range(s.epochs):
        order = torch.randperm(cut, generator=gen).to(device)
        for b0 in range(0, cut, s.batch):
            idx = order[b0 : b0 + s.batch]
            loss = F.mse_loss(_forward(params, xn[:, idx]), yn[:, idx], reduction="none")
            opt.zero_grad(set_to_none=True)
            loss.mean(dim=(1, 2)).sum().backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, s.clip * math.sqrt(n_layers))
            opt.step()
            sched.step()
        with torch.no_grad():
            val = (_forward(params, xn[:, cut:]) - yn[:, cut:]).pow(2).mean(dim=(1, 2))
            better = val < best_val
            best_val = torch.where(better, val, best_val)
            for kept, p in zip(best, params, strict=True):
                kept[better] = p.detach()[better]
        if tick:
            tick(1)
    return _fold(best, mx, sx, my, sy)


def _fold(
    params: list[torch.Tensor],
    mx: torch.Tensor,
    sx: torch.Tensor,
    my: torch.Tensor,
    sy: torch.Tensor,
) -> KVzapPredictor:
    """Weights trained on (x - mx) / sx -> (y - my) / sy, re-expressed on raw x and y."""
    w1, b1, w2, b2 = (p.detach() for p in params)
    inv = 1.0 / sx  # (L, 1, D)
    w1_raw = w1 * inv  # (L, F, D)
    b1_raw = b1 - (w1_raw * mx).sum(dim=2)
    w2_raw = w2 * sy.transpose(1, 2)  # (L, H, F) scaled by each head's std
    b2_raw = b2 * sy.squeeze(1) + my.squeeze(1)
    return KVzapPredictor(
        "mlp",
        w1_raw.contiguous().cpu(),
        b1_raw.contiguous().cpu(),
        w2_raw.contiguous().cpu(),
        b2_raw.contiguous().cpu(),
    )
