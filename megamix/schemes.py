"""Where the norms go: one row of facts per layer scheme, and the per-layer list a config asks for.

A *layer scheme* says where a transformer block's norms sit around each of its two sublayers F
(attention, then the MLP), with x the residual stream and N a norm with its own weight:

============  ====================================================  ==========================================
scheme        per sublayer                                          source
============  ====================================================  ==========================================
pre           x = x + F(N(x))                                       the standard LLaMA block
post          x = N(x + F(x))                                       the original Transformer
lns           x = x + F(N(x) / √(ℓ+1))                              LayerNorm Scaling (Curse of Depth)
peri          x = x + N_out(F(N_in(x)))                             Peri-LN
deepnorm      x = N(a·x + F(x))                                     DeepNet, a = (2L)^¼, init gain (8L)^-¼
olmo2         x = x + N(F(x)); QK-norm over the whole projection    OLMo 2's reordered norm
hybrid        attention x = N(x + A(x)), MLP x = x + M(x);          HybridNorm (per block: QKV-norm attention,
              q, k, v normalized per head                           then the FFN's Post-Norm)
hybrid_first  x = x + F(N(x)); q, k, v normalized per head          HybridNorm*'s first block
============  ====================================================  ==========================================

ℓ is the block's *global* index from 0 and L the number of blocks, so a pipeline stage holding
blocks 8–15 builds each from its global ℓ.  The model's ``norm.scheme`` is one of these for every
layer, or a *model scheme*: ``mix`` (Mix-LN: the first K layers ``post``, the rest ``pre``; K is
``norm.post_layers``, or ⌊α·L⌋ from ``norm.alpha``) or ``hybrid_star`` (HybridNorm*: a
``hybrid_first`` block, then ``hybrid`` blocks); ``norm.layers`` lists one scheme per layer.
:func:`layer_schemes` turns the config into that list.

Every fact about a scheme lives in its :class:`LayerScheme` row of :data:`SCHEMES`: which norms a
sublayer has (before it, on its output, after the residual add), the scale on the input norm's
output, the weight of x in the residual add, the norms its paper puts on the attention's q, k and v,
the initialization rule, and the exported Hugging Face names of its norms.  The model's block, its
initialization, config validation, ``megamix plan`` and the Hugging Face exporter all read these
rows, so a new scheme is one row (and its tests).  The docs (``docs/placements.md``) give the
formulas with their papers.

This module sits at the bottom of the package (beside the config) and imports nothing from megamix.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megamix.config import NormConfig

SUBLAYERS = ("attention", "mlp")
SLOTS = ("before", "output", "after")  # N(x) into F, N(F(·)) on its output, N(x + ·) after the add
# Norms inside attention, on q and k (QK-norm) or v, before RoPE: none; over the whole projection
# (OLMo 2; its statistics span the heads of every tensor-parallel rank); or over each head's
# head_dim features with one weight shared by the heads (Gemma 3, Qwen3, HybridNorm).
ATTENTION_NORMS = ("none", "full", "per_head")


class Scheme(str, enum.Enum):
    """The built-in layer schemes (their rows are in :data:`SCHEMES`)."""

    PRE = "pre"
    POST = "post"
    LNS = "lns"
    PERI = "peri"
    DEEPNORM = "deepnorm"
    OLMO2 = "olmo2"
    HYBRID = "hybrid"
    HYBRID_FIRST = "hybrid_first"


# Model schemes, not layer schemes: each names a list of layer schemes (see layer_schemes).
MIX = "mix"  # Mix-LN: Post-LN layers, then Pre-LN layers
HYBRID_STAR = "hybrid_star"  # HybridNorm*: one hybrid_first block, then hybrid blocks


@dataclass(frozen=True)
class SublayerNorms:
    """Which norms one sublayer has: ``before`` (F(N(x))), ``output`` (N(F(·))), ``after`` (N(x + ·))."""

    before: bool = False
    output: bool = False
    after: bool = False

    def slots(self) -> list[str]:
        return [slot for slot in SLOTS if getattr(self, slot)]


def _one(layer: int, num_layers: int, norm: NormConfig) -> float:
    return 1.0


@dataclass(frozen=True)
class LayerScheme:
    """One layer scheme: everything megamix needs to build, initialize and export its blocks.

    ``input_scale`` and ``residual_weight`` are functions of (ℓ, L, the norm config): the factor on
    the ``before`` norm's output (LayerNorm Scaling's 1/√(ℓ+1)) and the weight a of x in the
    residual add (DeepNorm's (2L)^¼).  ``qk_norm`` and ``v_norm`` are the norms the scheme's paper
    puts on the attention's q and k, and on v (one of :data:`ATTENTION_NORMS`); ``norm.qk_norm`` and
    ``norm.v_norm`` override them for every layer (:func:`attention_norms`).  ``init`` names the
    weight initialization rule (see :meth:`megamix.model.llama.Transformer.init_weights`).
    ``hf_names`` maps ``(sublayer, slot)`` to the norm's name in a Hugging Face export
    (``model.layers.ℓ.<name>``); norms it does not name are exported as ``<sublayer>_<slot>_norm``.
    """

    name: str
    formula: str
    attention: SublayerNorms
    mlp: SublayerNorms
    input_scale: Callable[[int, int, NormConfig], float] = _one
    residual_weight: Callable[[int, int, NormConfig], float] = _one
    qk_norm: str = "none"
    v_norm: str = "none"
    init: str = "normal"  # normal: N(0, init_std²); deepnet: DeepNet's xavier-normal with gain (8L)^-¼
    hf_names: dict[tuple[str, str], str] = field(default_factory=dict)

    def norms(self, sublayer: str) -> SublayerNorms:
        return getattr(self, sublayer)

    def hf_name(self, sublayer: str, slot: str) -> str:
        return self.hf_names.get((sublayer, slot), f"{sublayer}_{slot}_norm")


def norm_attribute(scheme: LayerScheme, sublayer: str, slot: str) -> str:
    """The block attribute holding a sublayer's norm in the given slot.

    The sublayer's main norm (``before``, else ``after``) is ``<sublayer>_norm``, the norm on its
    output ``<sublayer>_out_norm``, and an ``after`` norm beside a ``before`` one
    ``<sublayer>_after_norm``: the names checkpoints have always used.
    """
    if slot == "output":
        return f"{sublayer}_out_norm"
    if slot == "after" and scheme.norms(sublayer).before:
        return f"{sublayer}_after_norm"
    return f"{sublayer}_norm"


def deepnorm_constants(norm: NormConfig, num_layers: int) -> tuple[float, float]:
    """DeepNet's decoder-only (a, b): residual weight (2L)^¼ and init gain (8L)^-¼, unless the
    config sets them (``norm.deepnorm_alpha``/``deepnorm_beta``, e.g. to reproduce the Mix-LN code)."""
    alpha = norm.deepnorm_alpha if norm.deepnorm_alpha is not None else (2 * num_layers) ** 0.25
    beta = norm.deepnorm_beta if norm.deepnorm_beta is not None else (8 * num_layers) ** -0.25
    return alpha, beta


_PRE = SublayerNorms(before=True)
_POST = SublayerNorms(after=True)
_PERI = SublayerNorms(before=True, output=True)
_OUT = SublayerNorms(output=True)
_NONE = SublayerNorms()
_PRE_NAMES = {("attention", "before"): "input_layernorm", ("mlp", "before"): "post_attention_layernorm"}
_POST_NAMES = {("attention", "after"): "post_attention_layernorm", ("mlp", "after"): "post_feedforward_layernorm"}

SCHEMES: dict[str, LayerScheme] = {
    row.name: row
    for row in (
        LayerScheme(Scheme.PRE.value, "x = x + F(N(x))", _PRE, _PRE, hf_names=_PRE_NAMES),
        LayerScheme(Scheme.POST.value, "x = N(x + F(x))", _POST, _POST, hf_names=_POST_NAMES),
        LayerScheme(Scheme.LNS.value, "x = x + F(N(x) / sqrt(l + 1))", _PRE, _PRE, hf_names=_PRE_NAMES,
                    input_scale=lambda layer, num_layers, norm: 1.0 / math.sqrt(layer + 1)),
        LayerScheme(Scheme.PERI.value, "x = x + N_out(F(N_in(x)))", _PERI, _PERI, hf_names={
            ("attention", "before"): "input_layernorm", ("attention", "output"): "post_attention_layernorm",
            ("mlp", "before"): "pre_feedforward_layernorm", ("mlp", "output"): "post_feedforward_layernorm"}),
        LayerScheme(Scheme.DEEPNORM.value, "x = N(a*x + F(x))", _POST, _POST, hf_names=_POST_NAMES, init="deepnet",
                    residual_weight=lambda layer, num_layers, norm: deepnorm_constants(norm, num_layers)[0]),
        # OLMo 2: the norm on the branch output only (Gemma 2's and Peri-LN's names for that slot).
        LayerScheme(Scheme.OLMO2.value, "x = x + N(F(x))", _OUT, _OUT, qk_norm="full", hf_names={
            ("attention", "output"): "post_attention_layernorm", ("mlp", "output"): "post_feedforward_layernorm"}),
        # HybridNorm: Y = X + MHA(QKV-norm) and X' = N(Y) + FFN(N(Y)), i.e. the norm after the
        # attention add, whose output is both the stream and the FFN's input.
        LayerScheme(Scheme.HYBRID.value, "attention: x = N(x + A(x)); mlp: x = x + F(x)", _POST, _NONE,
                    qk_norm="per_head", v_norm="per_head",
                    hf_names={("attention", "after"): "post_attention_layernorm"}),
        LayerScheme(Scheme.HYBRID_FIRST.value, "x = x + F(N(x))", _PRE, _PRE, qk_norm="per_head", v_norm="per_head",
                    hf_names=_PRE_NAMES),
    )
}


def model_schemes() -> tuple[str, ...]:
    """What ``norm.scheme`` may be: any layer scheme, ``mix`` or ``hybrid_star``."""
    return (*SCHEMES, MIX, HYBRID_STAR)


def num_post_ln_layers(alpha: float, num_layers: int) -> int:
    """⌊α·L⌋, computed exactly for the decimal α the user wrote (0.29 × 100 is 29, not 28)."""
    return int(Fraction(str(alpha)) * num_layers)


def post_ln_layers(norm: NormConfig, num_layers: int) -> int:
    """Mix-LN's number of Post-LN layers: ``norm.post_layers`` (the reference's ``POST_NUM``) if
    given, else ⌊α·L⌋ of ``norm.alpha``."""
    if norm.post_layers is not None:
        return norm.post_layers
    return num_post_ln_layers(norm.alpha, num_layers)


def layer_schemes(norm: NormConfig, num_layers: int) -> list[str]:
    """The scheme of each layer, by global layer index."""
    if norm.layers is not None:
        return list(norm.layers)
    if norm.scheme == MIX:
        post = post_ln_layers(norm, num_layers)
        return [Scheme.POST.value] * post + [Scheme.PRE.value] * (num_layers - post)
    if norm.scheme == HYBRID_STAR:
        return [Scheme.HYBRID_FIRST.value] + [Scheme.HYBRID.value] * (num_layers - 1)
    return [norm.scheme] * num_layers


def attention_norms(norm: NormConfig, scheme: str) -> tuple[str, str]:
    """The (q and k, v) norms of a layer of ``scheme``: ``norm.qk_norm``/``norm.v_norm`` where the
    config sets them (for every layer), else what the scheme's row says its paper uses."""
    row = SCHEMES[scheme]
    return (row.qk_norm if norm.qk_norm is None else norm.qk_norm,
            row.v_norm if norm.v_norm is None else norm.v_norm)


def describe_schemes(schemes: list[str]) -> str:
    """Run-length summary for logs and tables: ``['post', 'pre', 'pre']`` → ``"post×1 pre×2"``."""
    runs: list[list] = []
    for name in schemes:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return " ".join(f"{name}×{count}" for name, count in runs)
