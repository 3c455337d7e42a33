"""The one token sampler of every decode path (single or batched, CPU or CUDA).

    rows = [RowSampling.from_params(p) for p in params]   # once per request
    tokens = sample(logits, rows)                         # every step: (B, V) -> (B,)

Each row carries its own parameters and its own generator, so a row's token depends only
on its logits, its parameters and its generator: the same seeded request draws the same
tokens alone or in any batch, and rows can join or leave a batch between steps.

Temperature 0 is greedy (argmax). Otherwise: softmax(logits / temperature) in float64, the
nucleus (the shortest run of most probable tokens whose mass reaches top_p, at least the
top token), and one uniform u from the row's generator picks the token whose interval of
the nucleus' cumulative mass holds u * (nucleus mass). The generator lives on the CPU
whatever the logits' device: one float per sampled row and step crosses to the device, and
a seed draws the same uniforms on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.types import SamplingParams


@dataclass
class RowSampling:
    """One row's sampling state. generator None: the process-wide CPU generator (unseeded,
    so not reproducible and not independent of other unseeded rows)."""

    temperature: float
    top_p: float
    generator: torch.Generator | None = None

    @classmethod
    def from_params(cls, params: SamplingParams) -> RowSampling:
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        return cls(params.temperature, params.top_p, generator)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def uniform(self) -> float:
        """The next uniform in [0, 1) from this row's generator."""
        return float(torch.rand((), dtype=torch.float64, generator=self.generator))


def per_row(params: SamplingParams | Sequence[SamplingParams], rows: int) -> list[SamplingParams]:
    """One SamplingParams for every row, or one per row -> a list of `rows` of them."""
    if isinstance(params, SamplingParams):
        return [params] * rows
    if len(params) != rows:
        raise ValueError(f"{len(params)} sampling parameters for {rows} rows")
    return list(params)


def sample(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """logits (B, V) + B rows -> token ids (B,) int64 on logits' device.

    Greedy rows take the argmax and draw nothing; every other row draws one uniform from
    its generator (in row order) and goes through `nucleus_tokens`.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits {tuple(logits.shape)} for {len(rows)} rows")
    tokens = logits.argmax(dim=-1)  # (B,)
    drawn = [b for b, row in enumerate(rows) if not row.greedy]
    if not drawn:
        return tokens
    host = [[rows[b].temperature, rows[b].top_p, rows[b].uniform()] for b in drawn]
    per = torch.tensor(host, dtype=torch.float64).to(logits.device)  # (k, 3)
    index = torch.tensor(drawn, device=logits.device)  # (k,)
    tokens[index] = nucleus_tokens(logits[index], per[:, 0], per[:, 1], per[:, 2])
    return tokens


def nucleus_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Temperature + nucleus sampling by inverse CDF, row by row; deterministic given u.

    logits (B, V); temperature (B,) > 0; top_p (B,) in (0, 1]; u (B,) in [0, 1)
    -> token ids (B,) int64. Probabilities sorted descending (stable: ties keep vocabulary
    order); the nucleus is the first `size` of them, size = 1 + #{i < V-1: cdf[i] < top_p};
    the token is the first in the nucleus whose cdf exceeds u * cdf[size - 1].
    """
    probs = torch.softmax(logits.double() / temperature.double()[:, None], dim=-1)  # (B, V)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # (B, V)
    cdf = sorted_p.cumsum(dim=-1)  # (B, V)
    size = 1 + (cdf[:, :-1] < top_p.double()[:, None]).sum(dim=-1, keepdim=True)  # (B, 1)
    mass = cdf.gather(-1, size - 1)  # (B, 1)
    target = u.double()[:, None] * mass  # (B, 1)
    rank = torch.searchsorted(cdf, target, right=True).clamp(max=size - 1)  # (B, 1)
    return order.gather(-1, rank).squeeze(-1)
