"""Angular distance between the residual stream before and after a layer (or a block of n layers).

Gromov et al. (2024) measure how much a stretch of layers changes the hidden state with
d(x_ℓ, x_ℓ+n) = arccos(cos(x_ℓ, x_ℓ+n)) / π: 0 when the layers leave the direction unchanged (they
could be removed), 1 when they reverse it.  Mix-LN and Curse of Depth show it per layer (n = 1) to
argue that Pre-LN's deep layers barely do anything.  Their code takes the **last token** of each
sequence, the one whose state predicts the next word after the whole context; that is our default,
and ``tokens="all"`` averages over every position instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TOKEN_MODES = ("last", "all")


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / π along the last dimension, row by row.

    In float64 and clamped, because arccos is steep near 1: a float32 cosine of two identical
    vectors can read 1 − 6e-8, which arccos turns into a distance of 1e-4.
    """
    cos = (F.normalize(a.double(), dim=-1) * F.normalize(b.double(), dim=-1)).sum(-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


class AngularDistances:
    """Running means of d(x_ℓ, x_ℓ+n) for every start layer ℓ and block size n = 1 … L.

    ``update`` takes the L+1 states x_0 … x_L of a batch (see
    :func:`megamix.analysis.hidden_states.hidden_states`); the means are over sequences (last-token
    mode) or over all tokens.
    """

    def __init__(self, num_layers: int, tokens: str = "last"):
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}; got {tokens!r}")
        self.num_layers = num_layers
        self.tokens = tokens
        self.sums = [[0.0] * (num_layers - n + 1) for n in range(1, num_layers + 1)]  # [n - 1][ℓ]
        self.count = 0

    def update(self, states: list[torch.Tensor]) -> None:
        if len(states) != self.num_layers + 1:
            raise ValueError(f"expected {self.num_layers + 1} hidden states, got {len(states)}")
        rows = [(s[:, -1] if self.tokens == "last" else s.flatten(0, -2)).detach() for s in states]
        for n, sums in enumerate(self.sums, start=1):
            for start in range(len(sums)):
                sums[start] += float(angular_distance(rows[start], rows[start + n]).sum())
        self.count += rows[0].shape[0]

    def blocks(self) -> list[list[float]]:
        """``[n - 1][ℓ]``: the mean distance across layers ℓ … ℓ+n−1 (Gromov et al.'s heat map)."""
        return [[s / self.count for s in sums] for sums in self.sums]

    def per_layer(self) -> list[float]:
        """The mean distance between each layer's input and output (n = 1)."""
        return self.blocks()[0]
