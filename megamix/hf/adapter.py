"""Between megamix and Hugging Face Llama: weight names and model configs, as pure functions.

The exporter, the importer and the tests share these, so a name can only be wrong in one place.
No tensor is touched: megamix's rotary embedding already uses the half-split layout transformers'
Llama expects, so q and k need no permutation, and every weight keeps its shape.

Layer ℓ's norm names come from its scheme's row (:data:`megamix.schemes.SCHEMES`, ``hf_names``):
Pre-LN and Post-LN layers use the names of the Mix-LN reference code, so its checkpoints and our
exports are interchangeable (docs/placements.md).  ``config.json`` carries each layer's row as
data (``layer_norms``), which the shipped ``modeling_megamix.py`` builds its layers from, so a new
scheme needs no change to that file.
"""

from __future__ import annotations

import re

from megamix.config import ModelConfig, NormConfig
from megamix.errors import MegamixError
from megamix.schemes import (
    ATTENTION_NORMS,
    SCHEMES,
    SLOTS,
    SUBLAYERS,
    Scheme,
    attention_norms,
    layer_schemes,
    norm_attribute,
)


class HFFormatError(MegamixError, ValueError):
    """A Hugging Face ``config.json`` describes a model megamix cannot represent."""

_TOP_LEVEL = {"embed_tokens": "model.embed_tokens", "embed_scale": "model.embed_scale",
              "embed_norm": "model.embed_norm", "norm": "model.norm", "lm_head": "lm_head"}
_SUBLAYER_MODULES = {"attention": "self_attn", "mlp": "mlp"}
_OURS = re.compile(r"^layers\.(\d+)\.([a-z_]+)\.(.+)$")
_THEIRS = re.compile(r"^model\.layers\.(\d+)\.([a-z_]+)\.(.+)$")


def norm_names(scheme: str) -> dict[str, str]:
    """``{megamix block attribute: Hugging Face layer attribute}`` for a scheme's norms."""
    row = SCHEMES[scheme]
    return {norm_attribute(row, sublayer, slot): row.hf_name(sublayer, slot)
            for sublayer in SUBLAYERS for slot in row.norms(sublayer).slots()}


def to_hf_name(name: str, schemes: list[str]) -> str:
    """``layers.3.attention.q_proj.weight`` → ``model.layers.3.self_attn.q_proj.weight``."""
    match = _OURS.match(name)
    if match is None:
        module, _, rest = name.partition(".")
        if module not in _TOP_LEVEL:
            raise KeyError(f"no Hugging Face name for {name!r}")
        return f"{_TOP_LEVEL[module]}.{rest}"
    layer, module, rest = match.groups()
    if module in _SUBLAYER_MODULES:
        return f"model.layers.{layer}.{_SUBLAYER_MODULES[module]}.{rest}"
    names = norm_names(schemes[int(layer)])
    if module not in names:
        raise KeyError(f"{name!r}: a {schemes[int(layer)]!r} layer has no {module}")
    return f"model.layers.{layer}.{names[module]}.{rest}"


def from_hf_name(name: str, schemes: list[str]) -> str:
    """The inverse of :func:`to_hf_name`."""
    match = _THEIRS.match(name)
    if match is None:
        for ours, theirs in _TOP_LEVEL.items():
            if name.startswith(theirs + "."):
                return ours + name[len(theirs):]
        raise KeyError(f"no megamix name for {name!r}")
    layer, module, rest = match.groups()
    inverse = {theirs: ours for ours, theirs in _SUBLAYER_MODULES.items()}
    inverse.update({theirs: ours for ours, theirs in norm_names(schemes[int(layer)]).items()})
    if module not in inverse:
        raise KeyError(f"{name!r}: a {schemes[int(layer)]!r} layer has no {module}")
    return f"layers.{layer}.{inverse[module]}.{rest}"


def layer_norm_rows(norm: NormConfig, num_layers: int) -> list[dict]:
    """Each layer's norms as data for ``modeling_megamix.py``: per sublayer the Hugging Face name
    of its norm in each slot (``before``, ``output``, ``after``; None where it has none), the norms
    on q and k and on v (``none``, ``full``, ``per_head``), the scale on the ``before`` norm's output
    and the weight of x in the residual add."""
    rows = []
    for index, scheme in enumerate(layer_schemes(norm, num_layers)):
        row = SCHEMES[scheme]
        entry: dict = {"scheme": scheme}
        for sublayer in SUBLAYERS:
            present = row.norms(sublayer).slots()
            entry[sublayer] = {slot: row.hf_name(sublayer, slot) if slot in present else None for slot in SLOTS}
        entry["qk_norm"], entry["v_norm"] = attention_norms(norm, scheme)
        entry["input_scale"] = row.input_scale(index, num_layers, norm)
        entry["residual_weight"] = row.residual_weight(index, num_layers, norm)
        rows.append(entry)
    return rows


def is_stock_llama(model: ModelConfig, norm: NormConfig) -> bool:
    """Every layer plain Pre-LN with RMSNorm, no norms in attention, nothing on the embedding (no
    norm, no scale): transformers' own LlamaForCausalLM is this model."""
    schemes = layer_schemes(norm, model.num_layers)
    return (norm.type == "rmsnorm" and not norm.embedding_norm and not model.embedding_scale
            and all(scheme == Scheme.PRE.value for scheme in schemes)
            and all(attention_norms(norm, scheme) == ("none", "none") for scheme in schemes))


def hf_config(model: ModelConfig, norm: NormConfig) -> dict:
    """``config.json`` fields for a megamix model: a ``llama`` config, plus the per-layer norm rows
    of ``modeling_megamix.MegamixConfig`` (``model_type: megamix``) unless it is stock Llama."""
    fields = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": model.init_std,
    }
    if not is_stock_llama(model, norm):
        fields.update(
            architectures=["MegamixForCausalLM"],
            model_type="megamix",
            layer_schemes=layer_schemes(norm, model.num_layers),
            layer_norms=layer_norm_rows(norm, model.num_layers),
            norm_type=norm.type,
            embedding_norm=norm.embedding_norm,
            embedding_scale=model.embedding_scale,
        )
    return fields


def config_from_hf(fields: dict) -> dict:
    """The megamix config (as a YAML-style tree) of a Hugging Face Llama or megamix-export
    ``config.json``.  Refuses what megamix's model cannot represent rather than import a
    different model."""
    model_type = fields.get("model_type")
    if model_type not in ("llama", "megamix"):
        raise HFFormatError(f"model_type {model_type!r}: only Llama (and megamix exports) can be imported")
    hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
    unsupported = {
        "hidden_act": (fields.get("hidden_act", "silu"), "silu"),
        "attention_bias": (fields.get("attention_bias", False), False),
        "mlp_bias": (fields.get("mlp_bias", False), False),
        "head_dim": (fields.get("head_dim") or hidden // heads, hidden // heads),
        "pretraining_tp": (fields.get("pretraining_tp") or 1, 1),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise HFFormatError(f"{key}={value!r} is not supported by megamix's model (needs {supported!r})")
    rope = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFFormatError(f"RoPE scaling {rope!r} is not supported by megamix's model (plain RoPE only)")
    rope_theta = rope.get("rope_theta", fields.get("rope_theta", 10000.0))
    max_seq_len = fields.get("max_position_embeddings", 2048)
    norm = {"type": "rmsnorm", "scheme": "pre"}
    if model_type == "megamix":
        norm = megamix_norm_config(fields)
    return {
        "model": {
            "vocab_size": fields["vocab_size"],
            "hidden_size": hidden,
            "intermediate_size": fields["intermediate_size"],
            "num_layers": fields["num_hidden_layers"],
            "num_heads": heads,
            "num_kv_heads": fields.get("num_key_value_heads") or heads,
            "max_seq_len": max_seq_len,
            "rope_theta": float(rope_theta),
            "norm_eps": float(fields.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(fields.get("tie_word_embeddings", False)),
            "init_std": float(fields.get("initializer_range", 0.02)),
            "embedding_scale": model_type == "megamix" and bool(fields.get("embedding_scale", False)),
        },
        "norm": norm,
        "data": {"seq_len": min(256, max_seq_len)},
    }


def megamix_norm_config(fields: dict) -> dict:
    """The ``norm`` section of a megamix export's ``config.json``: its per-layer schemes, the
    residual weight of its DeepNorm layers (exports before the per-layer rows wrote
    ``layer_placements`` and ``deepnorm_alpha``), the norms in attention and on the embedding."""
    schemes = fields.get("layer_schemes") or fields.get("layer_placements")
    if not isinstance(schemes, list) or len(schemes) != fields.get("num_hidden_layers"):
        raise HFFormatError("a megamix config.json needs layer_schemes, one per layer")
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        raise HFFormatError(f"layer schemes {unknown} are unknown to this megamix (known: {', '.join(SCHEMES)})")
    norm: dict = {"type": fields.get("norm_type", "rmsnorm"), "layers": schemes}
    weights = {row["residual_weight"] for row, scheme in zip(fields.get("layer_norms") or [], schemes)
               if scheme == Scheme.DEEPNORM.value}
    if "deepnorm_alpha" in fields:
        weights = {fields["deepnorm_alpha"]}
    if len(weights) == 1:
        norm["deepnorm_alpha"] = float(weights.pop())
    if fields.get("embedding_norm"):
        norm["embedding_norm"] = True
    rows = fields.get("layer_norms") or [{} for _ in schemes]
    for key in ("qk_norm", "v_norm"):
        forms = [row.get(key, "none") for row in rows]
        unknown = sorted(set(forms) - set(ATTENTION_NORMS))
        if unknown:
            raise HFFormatError(f"layer_norms: {key} {unknown} is unknown to this megamix (known: {ATTENTION_NORMS})")
        defaults = [getattr(SCHEMES[scheme], key) for scheme in schemes]
        if forms != defaults:  # the config set one form for every layer
            if len(set(forms)) != 1:
                raise HFFormatError(f"layer_norms: the {key} of each layer ({forms}) is neither its scheme's "
                                    "nor one form for every layer")
            norm[key] = forms[0]
    return norm
