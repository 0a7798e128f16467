"""The norm layer every scheme uses: RMSNorm or LayerNorm, with an optional residual add.

``Norm(x)`` is ``N(x) * scale``; ``Norm(y, residual=x)`` is ``N(x + y) * scale``;
``Norm.add_norm(branch, stream)`` also returns the sum, the new residual stream: the add of a
sublayer's output to the stream and the next norm are one fused op (see ``Block``).  Statistics
are in fp32.  The arithmetic lives in :mod:`megamix.ops.fused_norm`, which picks the CUDA kernel
or the PyTorch path.
"""

from __future__ import annotations

import torch
from torch import nn

from megamix.ops import fused_norm

_KIND = {"rmsnorm": "rms", "layernorm": "layer"}


class Norm(nn.Module):
    def __init__(self, dim: int, norm_type: str = "rmsnorm", eps: float = 1e-6, scale: float = 1.0):
        super().__init__()
        self.kind = _KIND[norm_type]
        self.eps = eps
        self.scale = scale  # LayerNorm Scaling's 1/sqrt(ℓ+1); 1 elsewhere
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if self.kind == "layer" else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.add_norm(x, residual)[0] if residual is not None else self.add_norm(None, x)[0]

    def add_norm(self, branch: torch.Tensor | None, stream: torch.Tensor,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N(stream + branch) * scale, stream + branch)`` in one fused op (no add without a
        branch); the sum has the wider of the two dtypes, ``y`` the branch's (or ``out_dtype``)."""
        if branch is None:
            branch, stream = stream, None
        return fused_norm.fused_add_norm(branch, stream, self.weight, self.bias, eps=self.eps, kind=self.kind,
                                         scale=self.scale, out_dtype=out_dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:.4g}" if self.scale != 1.0 else ""
        return f"{self.weight.shape[0]}, kind={self.kind}, eps={self.eps}{scale}"
