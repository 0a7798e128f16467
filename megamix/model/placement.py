"""Where the norms go, layer by layer: the one function every part of megamix reads.

``layer_placements(norm_cfg, num_layers)`` returns one kind per layer, indexed by the *global*
layer index ℓ.  The model builds block ℓ from entry ℓ, a pipeline stage holding layers 8–15 reads
entries 8–15, and ``megamix plan``, the HF exporter and the tests all read the same list.

Kinds (formulas per sublayer F, with N the layer's norm; see the README's table):

- ``pre``:      x = x + F(N(x))
- ``post``:     x = N(x + F(x))
- ``lns``:      x = x + F(N(x) / sqrt(ℓ + 1))      (LayerNorm Scaling)
- ``peri``:     x = x + N_out(F(N_in(x)))
- ``deepnorm``: x = N(a·x + F(x))

The scheme ``mix`` (Mix-LN) is not a kind of its own: it makes layers ℓ < ⌊α·L⌋ ``post`` and the
rest ``pre``.
"""

from __future__ import annotations

from fractions import Fraction

from megamix.config import NormConfig


def num_post_ln_layers(alpha: float, num_layers: int) -> int:
    """⌊α·L⌋, computed exactly for the decimal α the user wrote (0.29 × 100 is 29, not 28)."""
    return int(Fraction(str(alpha)) * num_layers)


def layer_placements(norm: NormConfig, num_layers: int) -> list[str]:
    """The norm placement of each layer, by global layer index."""
    if norm.layers is not None:
        return list(norm.layers)
    if norm.scheme == "mix":
        post_ln_layers = num_post_ln_layers(norm.alpha, num_layers)
        return ["post"] * post_ln_layers + ["pre"] * (num_layers - post_ln_layers)
    return [norm.scheme] * num_layers


def deepnorm_constants(norm: NormConfig, num_layers: int) -> tuple[float, float]:
    """DeepNet's decoder-only (a, b): residual weight (2L)^¼ and init gain (8L)^-¼."""
    alpha = norm.deepnorm_alpha if norm.deepnorm_alpha is not None else (2 * num_layers) ** 0.25
    beta = norm.deepnorm_beta if norm.deepnorm_beta is not None else (8 * num_layers) ** -0.25
    return alpha, beta


def describe_placements(placements: list[str]) -> str:
    """Run-length summary for logs and tables: ``['post', 'pre', 'pre']`` → ``"post×1 pre×2"``."""
    runs: list[list] = []
    for kind in placements:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return " ".join(f"{kind}×{count}" for kind, count in runs)
