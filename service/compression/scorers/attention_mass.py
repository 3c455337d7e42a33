"""Attention mass: how much probability observed queries put on each context key.

Shared by the attention-statistics baselines (`h2o`, `snapkv`). The observed queries run
after a (possibly truncated) all-kept context; each query row sees every context key and
the tail keys up to itself (bottom-right causal), exactly as the model's own attention.
"""

from __future__ import annotations

import torch

from service.engine.kvcache import RaggedLayer

ROW_BLOCK = 256


class AttentionMass:
    """Accumulates, per layer, the summed attention probability on each context key.

    prefix_len: s; n: context length. Key positions are absolute (0 .. s + n - 1); only the
    context keys [s, s + n) are kept. After the forward, `mass[l]` is (H, n) fp32: the sum
    over the observed query rows and the G query heads of each KV head's group.
    """

    def __init__(self, prefix_len: int, n: int, n_layers: int) -> None:
        self.prefix_len, self.n = prefix_len, n
        self.mass: list[torch.Tensor | None] = [None] * n_layers
        self.rows = 0  # query rows observed (per layer)

    def observe(
        self,
        layer_idx: int,
        q: torch.Tensor,
        context: RaggedLayer | None,
        tail_k: torch.Tensor,
        scale: float,
        lse_context: torch.Tensor | None = None,
        lse_tail: torch.Tensor | None = None,
    ) -> None:
        """q (Hq, T, d); context: a uniform layer (H*c rows) or None; tail_k (H, S, d)."""
        keys = tail_k if context is None else torch.cat([context.dense()[0], tail_k], dim=1)
        if lse_tail is None:
            lse = _total_lse(q, keys, scale)
        else:
            lse = lse_tail if lse_context is None else torch.logaddexp(lse_context, lse_tail)
        got = _mass(q, keys, lse, scale)  # (H, c + S)
        if self.mass[layer_idx] is None:
            self.mass[layer_idx] = torch.zeros(
                keys.shape[0], self.n, dtype=torch.float32, device=q.device
            )
        acc = self.mass[layer_idx]
        assert acc is not None
        end = min(got.shape[1], self.prefix_len + self.n)
        if end > self.prefix_len:
            acc[:, : end - self.prefix_len] += got[:, self.prefix_len : end]
        if layer_idx == 0:
            self.rows += q.shape[1]


def _mass(q: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """Summed probabilities (H, K) of q (Hq, T, d) on keys (H, K, d), bottom-right causal."""
    h, k_len, d = keys.shape
    hq, t, _ = q.shape
    qg = q.view(h, hq // h, t, d)
    lse_g = lse.view(h, hq // h, t)
    cols = torch.arange(k_len, device=q.device)
    out = torch.zeros(h, k_len, dtype=torch.float32, device=q.device)
    for r0 in range(0, t, ROW_BLOCK):
        r1 = min(r0 + ROW_BLOCK, t)
        logits = torch.einsum("hgtd,hkd->hgtk", qg[:, :, r0:r1], keys).float() * scale
        logits -= lse_g[:, :, r0:r1].unsqueeze(-1)
        rows = torch.arange(r0, r1, device=q.device) + (k_len - t)
        logits.masked_fill_(cols.unsqueeze(0) > rows.unsqueeze(1), float("-inf"))
        out += logits.exp().sum(dim=(1, 2))
    return out


def _total_lse(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """log-sum-exp (Hq, T) of q over keys (H, K, d), bottom-right causal (dense fallback)."""
    h, k_len, _ = keys.shape
    hq, t, _ = q.shape
    kk = keys.float().repeat_interleave(hq // h, dim=0)
    logits = torch.matmul(q.float(), kk.transpose(1, 2)) * scale
    rows = torch.arange(t, device=q.device).unsqueeze(1) + (k_len - t)
    cols = torch.arange(k_len, device=q.device).unsqueeze(0)
    return torch.logsumexp(logits.masked_fill(cols > rows, float("-inf")), dim=-1)
