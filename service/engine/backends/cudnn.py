"""`cudnn` backend: the `cuda` backend, with cuDNN attention for the big dense calls.

On an H200 (torch 2.11) one causal 32K prefill layer (32 query / 8 KV heads, d 128) takes
14.2 ms in cuDNN and 25.6 ms in the FlashAttention-2 kernel the `cuda` backend calls
(docs/benchmarks.md). This backend routes to cuDNN, with the log-sum-exp it returns:
- prefill / tail blocks (T >= MIN_ROWS): bottom-right causal over (H, S, d) as a
  non-causal part over the first S - T keys and a causal T x T part, merged by lse
  (cuDNN's causal mask is top-left aligned, which equals bottom-right only when T == S);
- ragged context blocks whose layer is uniform (every head holds `max_len` keys: the
  all-kept context during ingest, so KVzip's reconstruction passes): one dense GQA call.
Everything else (decode-sized blocks, compressed ragged layers) goes to the `cuda` backend.
`auto` picks it on Hopper and newer GPUs (KVZIP_ATTENTION_BACKEND=cudnn forces it).
"""

from __future__ import annotations

import torch

from service.engine.backends import cuda, triton_merge

MIN_ROWS = 64  # query rows below which the Triton / flash paths of `cuda` are faster


def _cudnn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, T, d) over k/v (H, S, d), top-left causal or none -> out (Hq, T, d), lse fp32."""
    hq, t, _ = q.shape
    g = hq // k.shape[0]
    if g > 1:  # grouped-query: each KV head serves g consecutive query heads
        k, v = k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, True, 0.0, causal, False,
        scale=scale,
    )  # fmt: skip
    return out[0], lse.reshape(hq, t).float()


def _merge(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of two key sets: (out, lse) from both partials."""
    return triton_merge.merge(a[0], a[1], b[0], b[1]), torch.logaddexp(a[1], b[1])


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, T, d) over k/v (H, S, d), bottom-right causal -> out (Hq, T, d), lse (Hq, T)."""
    t, s = q.shape[1], k.shape[1]
    if t < MIN_ROWS or s < t:
        return cuda.causal_attention(q, k, v, scale)
    own = _cudnn(q, k[:, s - t :], v[:, s - t :], scale, causal=True)
    if s == t:
        return own
    return _merge(_cudnn(q, k[:, : s - t], v[:, : s - t], scale, causal=False), own)


def ragged_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_lens: torch.Tensor,
    scale: float,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, T, d) over ragged keys/values (N, d), cu_lens (H+1,) -> out, lse (Hq, T).

    A layer with N == H * max_len holds exactly max_len keys in every head (no head can
    hold more than max_len), so it is dense: one cuDNN call, no host sync to find out.
    """
    h, d = cu_lens.numel() - 1, keys.shape[-1]
    uniform = max_len is not None and max_len > 0 and keys.shape[0] == h * max_len
    if not uniform or q.shape[1] < MIN_ROWS:
        return cuda.ragged_attention(q, keys, values, cu_lens, scale, max_len)
    assert max_len is not None
    return _cudnn(q, keys.view(h, max_len, d), values.view(h, max_len, d), scale, causal=False)
