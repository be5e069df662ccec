"""One LoRA expert: the low-rank pair ``(A, B)`` and its scale.

An expert owns nothing but its two matrices, so a pool of experts of different
ranks is a ``ModuleDict`` of these (the way PEFT keeps per-adapter ``ModuleDict``s)
and freezing one is ``requires_grad_(False)`` on it alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the adapters' dtype. Under autocast ``x`` stays as it is: autocast casts it for the
    matmul itself, and a cast copy made here would be one more input-sized tensor saved for backward
    beside the one the base layer saves (PEFT's LoRA keeps one too)."""
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


class LoRAExpert(nn.Module):
    """``delta(x) = scale * B (A x)`` with ``A``: (rank, in_features), ``B``: (out_features, rank).

    ``scale`` is ``alpha / rank`` (alpha = 2r by default, i.e. scale 2).
    Initialization follows PEFT's LoRA default: A Kaiming-uniform, B zero, so a
    new expert starts as the identity on the base layer's output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        alpha: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = float(2 * rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features). The scale is folded into
        # B (out x rank) rather than applied to the (tokens x out) result: one
        # pass over the output less, forward and backward.
        return F.linear(F.linear(adapter_input(x, self.A.dtype), self.A), self.B * self.scale)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scale * B A`` (out_features, in_features)."""
        return (self.B @ self.A) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"
