"""The papers' reference code as a peer: its placement values ↔ megamix's per-layer schemes.

The Mix-LN and Curse of Depth code (pixeli99/MixLN, its successor pixeli99/MixLN-Next, and
lmsdss/LayerNorm-Scaling) keeps the placement outside the checkpoint, in two environment variables
its ``LlamaDecoderLayer`` reads: ``NORM_TYPE`` (lower-cased before use) and ``POST_NUM`` (the
*number* of leading Post-LN layers of ``post_pre``; 1 when unset).  Its checkpoints are
``save_pretrained`` directories of a ``"model_type": "llama"`` config, with the norm weights named
as megamix exports them (``docs/placements.md``).

One table, :data:`REFERENCE_TYPES`, says which ``NORM_TYPE`` values megamix computes exactly and
as which per-layer schemes; it is read in both directions: :func:`reference_norm_config` turns the
reference's values into megamix's ``norm`` section (``tools/convert_from_hf.py
--reference-norm-type``), :func:`reference_record` finds the values that load a megamix export in
the reference code (``config.json``'s ``"reference"``).  The values its model file knows but
megamix cannot compute are refused by name (:data:`NOT_REPRESENTABLE`, with the reason).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from megamix.config import ModelConfig, NormConfig
from megamix.hf.adapter import HFFormatError
from megamix.schemes import SCHEMES, deepnorm_constants, layer_schemes


class ReferenceNormTypeError(HFFormatError):
    """A ``NORM_TYPE`` (or ``POST_NUM``) megamix cannot represent, or that is not the reference's."""


MIXLN = "pixeli99/MixLN"
MIXLN_NEXT = "pixeli99/MixLN-Next"
LNS_CODE = "lmsdss/LayerNorm-Scaling"
# ``deeppost`` weighs the skip input by this constant at every depth in pixeli99/MixLN and
# lmsdss/LayerNorm-Scaling: DeepNet's (2L)^¼ for L = 32.  MixLN-Next's later model file computes
# (2L)^¼ from the model's depth instead.  Both initialize v, o and the MLP with xavier-normal gain
# (8L)^+¼ (DeepNet's is (8L)^-¼).
DEEPPOST_ALPHA = 2.8284271247461903
# ``pre_post`` and ``pre_sandwich`` hard-code their first 7 layers as Pre-LN.
HARD_CODED_PRE_LAYERS = 7


def _repeat(scheme: str) -> Callable[[int, int], list[str]]:
    return lambda num_layers, post_num: [scheme] * num_layers


def _post_then_pre(num_layers: int, post_num: int) -> list[str]:
    """``layer_index < POST_NUM`` is Post-LN, the rest Pre-LN."""
    return ["post" if i < post_num else "pre" for i in range(num_layers)]


def _seven_then(scheme: str) -> Callable[[int, int], list[str]]:
    return lambda num_layers, post_num: ["pre" if i < HARD_CODED_PRE_LAYERS else scheme for i in range(num_layers)]


def _every_fourth_pre(num_layers: int, post_num: int) -> list[str]:
    """``post_pre_post_pre``: layers with (ℓ + 1) % 4 == 0 Pre-LN, the others Post-LN."""
    return ["pre" if (i + 1) % 4 == 0 else "post" for i in range(num_layers)]


@dataclass(frozen=True)
class ReferenceType:
    """One ``NORM_TYPE`` megamix computes exactly: the per-layer schemes it gives a model of L
    layers, whether it reads ``POST_NUM``, the extra ``norm`` fields of its constants, the
    repositories whose model file has it, and what a user should know."""

    name: str
    schemes: Callable[[int, int], list[str]]
    code: tuple[str, ...] = (MIXLN, MIXLN_NEXT, LNS_CODE)
    uses_post_num: bool = False
    norm_fields: Callable[[int], dict] = lambda num_layers: {}
    note: str | None = None
    # tensors its checkpoints hold that its forward never reads (MixLN-Next's Pre-LN layers build
    # a non-trainable ``alpha_t`` for its ``cod`` type): skipped on import
    unused_tensors: tuple[str, ...] = ()


def _deeppost_fields(num_layers: int) -> dict:
    return {"deepnorm_alpha": DEEPPOST_ALPHA, "deepnorm_beta": (8 * num_layers) ** 0.25}


REFERENCE_TYPES: dict[str, ReferenceType] = {
    row.name: row
    for row in (
        ReferenceType("pre", _repeat("pre"), unused_tensors=("alpha_t",)),
        ReferenceType("scale_pre", _repeat("pre"), unused_tensors=("alpha_t",),
                      note="scale_pre differs from pre only in its initialization (model.scaled_init)"),
        ReferenceType("post", _repeat("post")),
        ReferenceType("post_pre", _post_then_pre, uses_post_num=True),
        ReferenceType("scale_post_pre", _post_then_pre, uses_post_num=True,
                      note="scale_post_pre differs from post_pre only in its initialization"),
        ReferenceType("deeppost", _repeat("deepnorm"), norm_fields=_deeppost_fields,
                      code=(MIXLN, LNS_CODE),
                      note=f"the residual weight is the constant {DEEPPOST_ALPHA} of pixeli99/MixLN and "
                           "LayerNorm-Scaling; MixLN-Next's later model file uses (2L)^(1/4): for it, "
                           "add --set norm.deepnorm_alpha=<(2L)^(1/4)>"),
        ReferenceType("sandwich", _repeat("peri")),
        ReferenceType("lns", _repeat("lns"), code=(LNS_CODE,),
                      note="as published, LayerNorm-Scaling lower-cases NORM_TYPE and then compares it with "
                           "'LNS', so neither branch matches: fix that comparison first "
                           "(docs/reference_code.md)"),
        ReferenceType("pre_post", _seven_then("post"), code=(MIXLN, MIXLN_NEXT, LNS_CODE),
                      note="pre_post hard-codes 7 Pre-LN layers, then Post-LN"),
        ReferenceType("pre_sandwich", _seven_then("peri"),
                      note="pre_sandwich hard-codes 7 Pre-LN layers, then sandwich (Peri-LN)"),
        ReferenceType("post_pre_post_pre", _every_fourth_pre,
                      note="post_pre_post_pre: Pre-LN where (layer + 1) % 4 == 0, Post-LN elsewhere"),
    )
}

NOT_REPRESENTABLE: dict[str, str] = {
    "mono": "a gumbel-softmax router mixes a Pre-LN and a Post-LN pass in every fourth layer",
    "mono_reverse": "a gumbel-softmax router mixes a Pre-LN and a Post-LN pass in every fourth layer",
    "scale_res_pre_norm": "learned scalars weigh each sublayer's output",
    "pre_post_pre_post": "the reference builds its norms but has no forward branch for it: every layer "
                         "returns its input unchanged",
    "admin": "a learned factor weighs the residual (Admin)",
    "deit": "a learned per-channel LayerScale weighs each sublayer's output",
    "radia": "RadialNorm is not a norm megamix has",
    "group_pre": "GroupNorm is not a norm megamix has",
    "reboot_pre": "its layers iterate on their own output",
    "cod": "it scales by a stored alpha_t vector (1/sqrt(l) only with layer_scale=true, and rounded to bf16); "
           "megamix's lns computes 1/sqrt(l+1) exactly: import it with --set norm.scheme=lns only if that "
           "approximation is what you want",
}


def reference_type(norm_type: str) -> ReferenceType:
    """The row of a ``NORM_TYPE`` value (compared lower-cased, as the reference does)."""
    key = norm_type.lower()
    if key in REFERENCE_TYPES:
        return REFERENCE_TYPES[key]
    if key in NOT_REPRESENTABLE:
        raise ReferenceNormTypeError(
            f"NORM_TYPE={norm_type} cannot be represented in megamix: {NOT_REPRESENTABLE[key]}")
    raise ReferenceNormTypeError(
        f"NORM_TYPE={norm_type!r} is not a placement of the reference code; megamix imports "
        f"{', '.join(REFERENCE_TYPES)}")


def reference_layer_schemes(norm_type: str, post_num: int | None, num_layers: int) -> list[str]:
    """Each layer's megamix scheme for ``NORM_TYPE``/``POST_NUM`` on a model of ``num_layers``."""
    row = reference_type(norm_type)
    if row.uses_post_num:
        if post_num is None:
            raise ReferenceNormTypeError(
                f"NORM_TYPE={norm_type} needs POST_NUM (--reference-post-num), the number of Post-LN layers "
                "the run used; the reference code takes 1 when the variable is unset")
        if post_num < 0:
            raise ReferenceNormTypeError(f"POST_NUM must not be negative; got {post_num}")
    return row.schemes(num_layers, post_num or 0)


def reference_norm_config(norm_type: str, post_num: int | None, num_layers: int) -> dict:
    """megamix's ``norm`` section (YAML-style) for the reference's values: an explicit per-layer
    list, which says exactly what the reference builds whatever the depth, plus the constants of
    ``deeppost``."""
    row = reference_type(norm_type)
    schemes = reference_layer_schemes(norm_type, post_num, num_layers)
    return {"type": "rmsnorm", "layers": schemes, **row.norm_fields(num_layers)}


# --- megamix → the reference ------------------------------------------------------------------

_NORM_FIELDS_KNOWN = {"type", "scheme", "alpha", "layers", "post_layers", "deepnorm_alpha", "deepnorm_beta"}
# Model fields that do not change what the model computes from its weights (initialization only).
_MODEL_FIELDS_INERT = {"vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "max_seq_len",
                       "norm_eps", "tie_embeddings", "init_std", "embed_init_std", "scaled_init",
                       "num_kv_heads", "rope_theta"}


def _non_default_fields(obj, known: set[str]) -> list[str]:
    """``section.field=value`` for every field not in ``known`` whose value is not its default: a
    placement option megamix gained after this table was written, which the reference lacks."""
    out = []
    for f in dataclasses.fields(obj):
        if f.name in known:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        value = getattr(obj, f.name)
        if value != default:
            out.append(f"{f.name}={value!r}")
    return out


@dataclass
class ReferenceRecord:
    """What ``config.json`` says about the reference: the values that load this export there, or
    None with the reason."""

    norm_type: str | None
    post_num: int | None = None
    code: tuple[str, ...] = ()
    note: str | None = None
    reason: str | None = None

    def fields(self) -> dict:
        if self.norm_type is None:
            return {"reference": None, "reference_note": self.reason}
        record: dict = {"NORM_TYPE": self.norm_type, "POST_NUM": self.post_num, "code": list(self.code)}
        if self.note:
            record["note"] = self.note
        return {"reference": record}


def reference_record(model: ModelConfig, norm: NormConfig) -> ReferenceRecord:
    """The ``NORM_TYPE`` (and ``POST_NUM``) under which the reference code computes this model from
    its exported weights, or why it cannot."""
    reasons = []
    if norm.type != "rmsnorm":
        reasons.append(f"norm.type={norm.type}: the reference code has RMSNorm only")
    reasons += [f"norm.{f}: the reference code has no such option"
                for f in _non_default_fields(norm, _NORM_FIELDS_KNOWN)]
    reasons += [f"model.{f}: the reference code has no such option"
                for f in _non_default_fields(model, _MODEL_FIELDS_INERT)]
    if model.kv_heads != model.num_heads:
        reasons.append(f"{model.kv_heads} key/value heads for {model.num_heads} query heads: the reference's "
                       "attention has no grouped-query attention")
    if model.rope_theta != 10000.0:
        reasons.append(f"model.rope_theta={model.rope_theta:g}: the reference's rotary embedding uses 10000")
    if reasons:
        return ReferenceRecord(None, reason="; ".join(reasons))
    num_layers = model.num_layers
    schemes = layer_schemes(norm, num_layers)
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        return ReferenceRecord(None, reason=f"layer schemes {unknown} are unknown here")
    leading_post = next((i for i, s in enumerate(schemes) if s != "post"), num_layers)
    for row in REFERENCE_TYPES.values():
        if row.name in ("scale_pre", "scale_post_pre"):  # initialization variants: the plain rows say it
            continue
        post_num = leading_post if row.uses_post_num else None
        if row.uses_post_num and not 0 < leading_post < num_layers:
            continue
        if row.schemes(num_layers, post_num or 0) != schemes:
            continue
        code, note = row.code, row.note
        if "deepnorm" in schemes:
            alpha = deepnorm_constants(norm, num_layers)[0]
            if abs(alpha - DEEPPOST_ALPHA) < 1e-9:
                code = (MIXLN, LNS_CODE) + ((MIXLN_NEXT,) if num_layers == 32 else ())
            elif abs(alpha - (2 * num_layers) ** 0.25) < 1e-9:
                code = (MIXLN_NEXT,) + ((MIXLN, LNS_CODE) if num_layers == 32 else ())
            else:
                return ReferenceRecord(None, reason=f"DeepNorm residual weight {alpha:g} is neither the reference's "
                                       f"constant {DEEPPOST_ALPHA:g} nor (2L)^(1/4)")
            note = ("deeppost: residual weight "
                    + (f"{DEEPPOST_ALPHA} (pixeli99/MixLN's constant)" if MIXLN in code else "(2L)^(1/4)"))
        return ReferenceRecord(row.name, post_num, code, note)
    return ReferenceRecord(None, reason="no NORM_TYPE of the reference code builds these layers "
                           f"({', '.join(schemes)})")


def reference_fields(model: ModelConfig, norm: NormConfig) -> dict:
    """``config.json`` fields: ``"reference"`` (and ``"reference_note"`` when it is null)."""
    return reference_record(model, norm).fields()
