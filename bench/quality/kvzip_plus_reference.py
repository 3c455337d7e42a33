"""An independent float64 reference for KVzip+ scores, written from the papers' definitions.

KVzip (Kim et al., arXiv 2505.23416, §3): the context is prefilled, then the model is asked
to reconstruct it ("Repeat the previous context exactly." + the context teacher-forced as
the answer); the score of context pair i in KV head h is the largest attention probability
a^{(g)}_{t,i} that any reconstruction query t of any query head g of h's group gives it.
Long contexts are reconstructed chunk by chunk; chunk k's queries see a LOCAL softmax over
[prefix] + [chunk k] + [their own reconstruction tokens] (§3.3, "chunked scoring").

KVzip+ (Jégou & Jeblick, "KVzap: Fast, Adaptive, and Faithful KV Cache Pruning",
arXiv 2601.07891, §2; after Devoto et al.'s reading of a token's contribution to the
residual stream) weights each probability by what pair i writes into the residual stream
through head g, relative to the receiving token's hidden state:

    s+_{l,h}(i) = max_{g in G(h)} max_{t in Q} a^{(g)}_{t,i} * ||W_O^{(g)} v_i|| / ||h_t||

    a^{(g)}_{t,i}   the attention probability of query t (head g) on key i
    W_O^{(g)}       the columns of the layer's output projection that read head g
    v_i             the value of pair i in KV head h (g's group)
    h_t             the attention input of query t (the hidden state after the layer's
                    input norm: what kvpress's KVzap collector and KVzipPress divide by;
                    the variant "kvzip_plus-residual" reads it as the residual stream
                    entering the layer instead)
    Q               the queries maxed over: the paper's KVzap targets take the copied
                    context tokens only ("the repeated prompt"); KVzip takes every token of
                    the reconstruction input (instruction, chat header and copy). A query
                    with h_t = 0 (a token whose embedding row is zero, in the first layer)
                    has no ratio and is left out, as the service does.

This module computes exactly that, from a float64 copy of the model whose attention is
replaced by an explicit float64 softmax: the probabilities are the model's own over every
visible key, renormalised over the chunk's local key set. It shares nothing with
`service.compression` but the prompt layout it is handed (the token ids). Used by
tests/service/test_kvzip_plus_reference.py (tiny model) and `python -m
bench.quality.kvzip_plus_reference` (the default model; docs/quality.md).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel

ATTENTION = "kvzip_plus_reference"


@dataclass(frozen=True)
class Chunk:
    """One reconstruction: context positions [start, end) (0 = the first context token) and
    the reconstruction input x (its last end - start ids are the chunk, copied)."""

    start: int
    end: int
    x: tuple[int, ...]


VARIANTS = {  # name -> (weights: the KVzip+ factors applied, queries maxed over)
    "kvzip": ("", "all"),
    "kvzip-copy": ("", "copy"),
    "kvzip_plus": ("value/hidden", "all"),
    "kvzip_plus-copy": ("value/hidden", "copy"),
    "kvzip-value": ("value", "all"),  # a * ||W_O v_i|| only (diagnostic)
    "kvzip-hidden": ("/hidden", "all"),  # a / ||h_t|| only (diagnostic)
    "kvzip_plus-residual": ("value/residual", "all"),  # h_t read as the residual stream
}


class _Probe:
    """Per forward: the attention input norms ||h_t|| and, per layer, every variant's scores."""

    def __init__(self, s: int, chunk: Chunk) -> None:
        self.s, self.chunk = s, chunk
        self.h_norm: dict[int, torch.Tensor] = {}  # attention inputs (after the input norm)
        self.r_norm: dict[int, torch.Tensor] = {}  # residual stream entering the layer
        self.scores: dict[str, dict[int, torch.Tensor]] = {name: {} for name in VARIANTS}

    def score(self, module: torch.nn.Module, probs: torch.Tensor, v: torch.Tensor) -> None:
        """probs (Hq, N, N) float64 model attention; v (H, N, d) values of this layer."""
        s, c, layer = self.s, self.chunk, int(module.layer_idx)  # type: ignore[arg-type]
        total, x_len, m = probs.shape[-1], len(c.x), c.end - c.start
        x_rows = torch.arange(total - x_len, total)
        local = torch.cat([torch.arange(s), torch.arange(s + c.start, s + c.end), x_rows])
        p = probs[:, x_rows]  # (Hq, T, N), zero on keys after each row (causal)
        p = p / p[:, :, local].sum(dim=-1, keepdim=True)  # renormalised over the local set
        a = p[:, :, s + c.start : s + c.end]  # (Hq, T, m): a_{t,i}
        hq, h, d = probs.shape[0], v.shape[0], v.shape[-1]
        group = hq // h
        w_o = module.o_proj.weight.double()  # type: ignore[union-attr]  # (D, Hq*d)
        chunk_v = v[:, s + c.start : s + c.end]  # (H, m, d)
        value_norm = torch.stack(
            [(chunk_v[j // group] @ w_o[:, j * d : (j + 1) * d].T).norm(dim=-1) for j in range(hq)]
        )  # (Hq, m): ||W_O^(j) v_i||
        h_norm = self.h_norm[layer][x_rows]  # (T,): ||h_t||
        inv_h = torch.where(h_norm > 0, 1.0 / h_norm, 0.0)  # h_t = 0 (a zero embedding
        # row, layer 0): no ratio, the query is left out
        weighted = {
            "": a,
            "value": a * value_norm[:, None, :],
            "/hidden": a * inv_h[None, :, None],
            "value/hidden": a * value_norm[:, None, :] * inv_h[None, :, None],
            "value/residual": a
            * value_norm[:, None, :]
            / self.r_norm[layer][x_rows][None, :, None],
        }
        for name, (factors, queries) in VARIANTS.items():
            w = weighted[factors]
            if queries == "copy":
                w = w[:, x_len - m :]
            best = w.amax(dim=1)  # max over the queries: (Hq, m)
            self.scores[name][layer] = best.view(h, group, m).amax(dim=1)


_ACTIVE: list[_Probe] = []


def _attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):  # type: ignore[no-untyped-def]
    """Plain causal attention in float64 with explicit probabilities (batch of one)."""
    q64, k64, v64 = q[0].double(), k[0].double(), v[0].double()  # (Hq|H, N, d)
    group = q64.shape[0] // k64.shape[0]
    kk = k64.repeat_interleave(group, 0)
    logits = q64 @ kk.transpose(1, 2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    n = logits.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    if _ACTIVE:
        _ACTIVE[-1].score(module, probs, v64)
    out = probs @ v64.repeat_interleave(group, 0)
    return out.transpose(0, 1).unsqueeze(0).to(q.dtype), None


def float64_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A float64 copy of `model` whose attention is the explicit softmax above."""
    AttentionInterface.register(ATTENTION, _attention)
    ref = copy.deepcopy(model).to(torch.float64).eval()
    ref.set_attn_implementation(ATTENTION)
    return ref


def reference_scores(
    model64: PreTrainedModel,
    ids: Sequence[int],
    prefix_len: int,
    chunks: Sequence[Chunk],
    variant: str = "kvzip_plus",
) -> list[torch.Tensor]:
    """Per layer the (H, n) float64 scores of the context ids[prefix_len:] by `variant`."""
    return reference_variants(model64, ids, prefix_len, chunks)[variant]


def reference_variants(
    model64: PreTrainedModel, ids: Sequence[int], prefix_len: int, chunks: Sequence[Chunk]
) -> dict[str, list[torch.Tensor]]:
    """Every VARIANTS entry: per layer (H, n) float64, from a `float64_copy` model."""
    s, n = prefix_len, len(ids) - prefix_len
    out: dict[str, dict[int, torch.Tensor]] = {name: {} for name in VARIANTS}
    for chunk in chunks:
        probe = _Probe(s, chunk)
        handles = [
            m.register_forward_pre_hook(
                _norm_hook(probe.h_norm, int(m.layer_idx)), with_kwargs=True
            )
            for m in model64.modules()
            if hasattr(m, "o_proj") and hasattr(m, "layer_idx")
        ] + [
            m.register_forward_pre_hook(
                _norm_hook(probe.r_norm, int(m.self_attn.layer_idx)), with_kwargs=True
            )
            for m in model64.modules()
            if hasattr(m, "self_attn") and hasattr(m, "input_layernorm")
        ]
        _ACTIVE.append(probe)
        try:
            with torch.no_grad():
                model64(torch.tensor([list(ids) + list(chunk.x)]), use_cache=False)
        finally:
            _ACTIVE.pop()
            for handle in handles:
                handle.remove()
        for name, layers in probe.scores.items():
            for layer, scores in layers.items():
                if layer not in out[name]:
                    out[name][layer] = torch.zeros(scores.shape[0], n, dtype=torch.float64)
                out[name][layer][:, chunk.start : chunk.end] = scores
    return {name: [layers[i] for i in sorted(layers)] for name, layers in out.items()}


def _norm_hook(sink: dict[int, torch.Tensor], layer: int):  # type: ignore[no-untyped-def]
    def record(module, args, kwargs):  # type: ignore[no-untyped-def]
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        sink[layer] = hidden[0].double().norm(dim=-1)

    return record
