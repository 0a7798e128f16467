"""The norm layer every scheme uses: RMSNorm, LayerNorm or DyT, with an optional residual add.

``Norm(x)`` is ``N(x) * scale``; ``Norm(y, residual=x)`` is ``N(x + y) * scale``;
``Norm.add_norm(branch, stream)`` also returns the sum, the new residual stream: the add of a
sublayer's output to the stream and the next norm are one fused op (see ``Block``).  Statistics
are in fp32.  The arithmetic lives in :mod:`megamix.ops.fused_norm`, which picks the CUDA kernel
or the PyTorch path.

DyT (``norm.type: dyt``, Zhu et al. 2025) replaces the normalization by ``γ ⊙ tanh(α·x) + β``
with a learned scalar α (initialized to ``alpha``): the same interface, in plain PyTorch (add,
then DyT).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from megamix.ops import fused_norm

_KIND = {"rmsnorm": "rms", "layernorm": "layer", "dyt": "dyt"}


class FeatureSplit(Protocol):
    """How a norm's features are divided among tensor-parallel ranks: set (as ``Norm.split``) by
    :mod:`megamix.parallel.tensor_parallel` on the norms of q, k and v, whose projections are
    split by columns.  One process never has one."""

    stats_span_ranks: bool  # a norm over the whole projection: its statistics need every rank's columns

    def local(self, param: torch.Tensor) -> torch.Tensor:
        """The parameter as this rank applies it (its shard, with a gradient that counts every rank)."""

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, differentiably."""


class Norm(nn.Module):
    def __init__(self, dim: int, norm_type: str = "rmsnorm", eps: float = 1e-6, scale: float = 1.0,
                 alpha: float = 0.5):
        super().__init__()
        self.kind = _KIND[norm_type]
        self.dim, self.eps = dim, eps
        self.scale = scale  # LayerNorm Scaling's 1/sqrt(ℓ+1); 1 elsewhere
        self.alpha_init = alpha  # DyT's α0
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if self.kind in ("layer", "dyt") else None
        self.alpha = nn.Parameter(torch.full((1,), float(alpha))) if self.kind == "dyt" else None
        self.split: FeatureSplit | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.add_norm(x, residual)[0] if residual is not None else self.add_norm(None, x)[0]

    def add_norm(self, branch: torch.Tensor | None, stream: torch.Tensor,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N(stream + branch) * scale, stream + branch)`` in one fused op (no add without a
        branch); the sum has the wider of the two dtypes, ``y`` the branch's (or ``out_dtype``)."""
        if branch is None:
            branch, stream = stream, None
        weight, bias, alpha = (p if p is None or self.split is None else self.split.local(p)
                               for p in (self.weight, self.bias, self.alpha))
        if self.kind == "dyt":
            return fused_norm.add_dyt(branch, stream, weight, bias, alpha, scale=self.scale, out_dtype=out_dtype)
        if self.split is not None and self.split.stats_span_ranks:
            s = branch if stream is None else branch + stream
            y = fused_norm.norm_split_features(s, weight, bias, self.eps, self.kind, self.dim, self.split.sum)
            return (y * self.scale if self.scale != 1.0 else y).to(out_dtype or branch.dtype), s
        return fused_norm.fused_add_norm(branch, stream, weight, bias, eps=self.eps, kind=self.kind,
                                         scale=self.scale, out_dtype=out_dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.alpha is not None:
            nn.init.constant_(self.alpha, self.alpha_init)

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:.4g}" if self.scale != 1.0 else ""
        detail = f"alpha0={self.alpha_init}" if self.kind == "dyt" else f"eps={self.eps}"
        return f"{self.dim}, kind={self.kind}, {detail}{scale}"
