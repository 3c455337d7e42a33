"""Attention backends behind one object (DESIGN.md, "Engine").

A `Backend` attends a query block to the ragged compressed context (`ragged_attention`)
and to the dense per-request tail (`causal_attention`), and combines the two partial
results exactly by their log-sum-exp (`merge_partials`). `build_backend` picks one by name;
each engine holds its own (attached to its model's attention modules, see
service.engine.attention_hook), so there is no process-wide choice. `REFERENCE` (plain
PyTorch) is the default and the oracle every other backend is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from service.engine.backends import reference, sdpa

if TYPE_CHECKING:
    from service.engine.rows import RowsCache

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_BACKENDS: dict[str, tuple[AttentionFn, AttentionFn]] = {
    "reference": (reference.ragged_attention, reference.causal_attention),
    "sdpa": (sdpa.ragged_attention, sdpa.causal_attention),
}
GPU_BACKENDS = ("cuda", "cudnn", "flash_attn")
"""The backends built on `cuda`: the Triton decode, scoring and merge kernels apply."""


def _register_cuda() -> None:
    """Add the CUDA backends when a GPU and Triton are present: `cuda` (PyTorch's flash
    kernel), `cudnn` when this torch has cuDNN attention, `flash_attn` when that package
    imports."""
    if not torch.cuda.is_available():
        return
    try:
        from service.engine.backends import cuda
    except ImportError:  # no triton
        return
    _BACKENDS["cuda"] = (cuda.ragged_attention, cuda.causal_attention)
    if torch.backends.cudnn.is_available() and hasattr(  # type: ignore[no-untyped-call]
        torch.ops.aten, "_scaled_dot_product_cudnn_attention"
    ):
        from service.engine.backends import cudnn

        _BACKENDS["cudnn"] = (cudnn.ragged_attention, cudnn.causal_attention)
    try:
        from service.engine.backends import flash_attn
    except ImportError:  # the flash-attn package is not installed
        return
    _BACKENDS["flash_attn"] = (flash_attn.ragged_attention, flash_attn.causal_attention)


_register_cuda()


def available_backends() -> list[str]:
    """Names usable on this machine."""
    return sorted(_BACKENDS)


@dataclass(frozen=True)
class Backend:
    """One attention implementation; see the module docstring. Built by `build_backend`."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in _BACKENDS:
            raise ValueError(
                f"unknown attention backend {self.name!r}; available: {available_backends()}"
            )

    @property
    def gpu_kernels(self) -> bool:
        """Whether this is one of the GPU backends (`cuda`, or one built on it), so the
        Triton decode, scoring and merge kernels apply."""
        return self.name in GPU_BACKENDS

    def ragged_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        cu_lens: torch.Tensor,
        scale: float,
        max_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (Hq, T, d) over keys/values (N, d), cu_lens (H+1,) -> out (Hq, T, d), lse (Hq, T).

        max_len: the longest head, when the caller knows it (lets a backend skip a sync).
        """
        return _BACKENDS[self.name][0](q, keys, values, cu_lens, scale, max_len)

    def causal_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (Hq, T, d) over k/v (H, S, d), bottom-right causal -> out (Hq, T, d), lse (Hq, T)."""
        return _BACKENDS[self.name][1](q, k, v, scale)

    def fused_static_decode(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        cu_lens: torch.Tensor,
        tail_k: torch.Tensor,
        tail_v: torch.Tensor,
        length: torch.Tensor,
        scale: float,
    ) -> torch.Tensor | None:
        """Decode-step attention over context + static tail, fused, when the backend has it.

        q (B, Hq, T, d); tail_k/v (B, H, C, d); length (B,). Returns (B, Hq, T, d) or None.
        """
        if not self.gpu_kernels:
            return None
        from service.engine.backends import cuda

        return cuda.fused_static_decode(q, keys, values, cu_lens, tail_k, tail_v, length, scale)

    def rows_decode(
        self, q: torch.Tensor, rows: RowsCache, layer: int, scale: float
    ) -> torch.Tensor | None:
        """Decode-step attention of a continuous batch, each row over its own context and
        tail, in one launch (the rows' pointer table), when the backend has it.

        q (B, Hq, T, d) -> (B, Hq, T, d), or None (CPU backends, blocks too big)."""
        table = rows.table
        b, hq, t, _ = q.shape
        if not self.gpu_kernels or table is None or not q.is_cuda:
            return None
        from service.engine.backends import triton_ragged, triton_rows

        keys, values = rows.tail_keys[layer], rows.tail_values[layer]
        assert keys is not None and values is not None
        if (hq // keys.shape[1]) * t > triton_ragged.MAX_ROWS or table.dtype != keys.dtype:
            return None
        return triton_rows.rows_decode(
            q, table.pointers[layer], keys, values, rows.length, scale, table.splits
        )

    def merge_partials(
        self, out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
    ) -> torch.Tensor:
        """`merge_partials`; on a GPU backend one fused Triton pass instead of the fp32
        elementwise chain (its 4-D result is laid out (B, T, Hq, d), what the model reads
        next)."""
        if self.gpu_kernels and out_a.is_cuda and 3 <= out_a.dim() <= 4:
            from service.engine.backends import triton_merge

            return triton_merge.merge(out_a, lse_a, out_b, lse_b)
        return merge_partials(out_a, lse_a, out_b, lse_b)


REFERENCE = Backend("reference")
"""The plain-PyTorch backend: the default where no engine chose one."""


def build_backend(name: str, device: torch.device | None = None) -> Backend:
    """The backend called `name`; `auto` picks the best one for `device`."""
    if name == "auto":
        name = pick_auto(device, available_backends(), _capability(device))
    return Backend(name)


def pick_auto(
    device: torch.device | None, available: list[str], capability: tuple[int, int] | None
) -> str:
    """The `auto` choice. CPU: `sdpa`. CUDA: `cudnn` on Hopper and newer (capability >= 9.0:
    cuDNN's attention is PyTorch's default there and, measured on an H200, 1.7x faster than
    FlashAttention-2 at 32K, docs/benchmarks.md), else the flash-attn package when
    installed, else `cuda` (PyTorch's flash kernel); `reference` without Triton."""
    if device is None or device.type != "cuda":
        return "sdpa"
    if "cudnn" in available and capability is not None and capability >= (9, 0):
        return "cudnn"
    for name in ("flash_attn", "cuda"):
        if name in available:
            return name
    return "reference"


def _capability(device: torch.device | None) -> tuple[int, int] | None:
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Exact softmax over the union of two key sets from their partial outputs.

    out_*: (Hq, T, d) or (B, Hq, T, d); lse_*: (Hq, T) / (B, Hq, T) fp32. Returns out_a's
    shape in out_a's dtype (plain PyTorch, in fp32).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype)
