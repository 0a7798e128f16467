"""Between megamix and Hugging Face Llama: weight names and model configs, as pure functions.

The exporter, the importer and the tests share these, so a name can only be wrong in one place.
No tensor is touched: megamix's rotary embedding already uses the half-split layout transformers'
Llama expects, so q and k need no permutation, and every weight keeps its shape.

Layer ℓ's norm names depend on its placement (SPEC.md, "Weight names"); ``modeling_megamix``
builds the same names on the transformers side.
"""

from __future__ import annotations

import re

from megamix.config import ModelConfig, NormConfig
from megamix.model.placement import deepnorm_constants, layer_placements

# megamix block attribute → HF decoder-layer attribute, per placement.
NORM_NAMES: dict[str, dict[str, str]] = {
    "pre": {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "lns": {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "post": {"attention_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"},
    "deepnorm": {"attention_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"},
    "peri": {
        "attention_norm": "input_layernorm",
        "attention_out_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm",
        "mlp_out_norm": "post_feedforward_layernorm",
    },
}
_TOP_LEVEL = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_OURS = re.compile(r"^layers\.(\d+)\.([a-z_]+)\.(.+)$")
_THEIRS = re.compile(r"^model\.layers\.(\d+)\.([a-z_]+)\.(.+)$")


def to_hf_name(name: str, placements: list[str]) -> str:
    """``layers.3.attention.q_proj.weight`` → ``model.layers.3.self_attn.q_proj.weight``."""
    match = _OURS.match(name)
    if match is None:
        module, _, rest = name.partition(".")
        if module not in _TOP_LEVEL:
            raise KeyError(f"no Hugging Face name for {name!r}")
        return f"{_TOP_LEVEL[module]}.{rest}"
    layer, module, rest = match.groups()
    if module == "attention":
        module = "self_attn"
    elif module != "mlp":
        norms = NORM_NAMES[placements[int(layer)]]
        if module not in norms:
            raise KeyError(f"{name!r}: a {placements[int(layer)]!r} layer has no {module}")
        module = norms[module]
    return f"model.layers.{layer}.{module}.{rest}"


def from_hf_name(name: str, placements: list[str]) -> str:
    """The inverse of :func:`to_hf_name`."""
    match = _THEIRS.match(name)
    if match is None:
        for ours, theirs in _TOP_LEVEL.items():
            if name.startswith(theirs + "."):
                return ours + name[len(theirs):]
        raise KeyError(f"no megamix name for {name!r}")
    layer, module, rest = match.groups()
    if module == "self_attn":
        module = "attention"
    elif module != "mlp":
        kind = placements[int(layer)]
        inverse = {theirs: ours for ours, theirs in NORM_NAMES[kind].items()}
        if module not in inverse:
            raise KeyError(f"{name!r}: a {kind!r} layer has no {module}")
        module = inverse[module]
    return f"layers.{layer}.{module}.{rest}"


def to_hf(state_dict: dict, placements: list[str]) -> dict:
    return {to_hf_name(k, placements): v for k, v in state_dict.items()}


def from_hf(state_dict: dict, placements: list[str]) -> dict:
    return {from_hf_name(k, placements): v for k, v in state_dict.items()}


def is_stock_llama(norm: NormConfig, num_layers: int) -> bool:
    """Every layer plain Pre-LN with RMSNorm: transformers' own LlamaForCausalLM is this model."""
    return norm.type == "rmsnorm" and all(kind == "pre" for kind in layer_placements(norm, num_layers))


def hf_config(model: ModelConfig, norm: NormConfig) -> dict:
    """``config.json`` fields for a megamix model: a ``llama`` config, plus the placement fields
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
    if not is_stock_llama(norm, model.num_layers):
        fields.update(
            architectures=["MegamixForCausalLM"],
            model_type="megamix",
            layer_placements=layer_placements(norm, model.num_layers),
            norm_type=norm.type,
            deepnorm_alpha=deepnorm_constants(norm, model.num_layers)[0],
        )
    return fields


def config_from_hf(fields: dict) -> dict:
    """The megamix config (as a YAML-style tree) of a Hugging Face Llama or megamix-export
    ``config.json``.  Refuses what megamix's model cannot represent rather than import a
    different model."""
    model_type = fields.get("model_type")
    if model_type not in ("llama", "megamix"):
        raise ValueError(f"model_type {model_type!r}: only Llama (and megamix exports) can be imported")
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
            raise ValueError(f"{key}={value!r} is not supported by megamix's model (needs {supported!r})")
    rope = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"RoPE scaling {rope!r} is not supported by megamix's model (plain RoPE only)")
    rope_theta = rope.get("rope_theta", fields.get("rope_theta", 10000.0))
    max_seq_len = fields.get("max_position_embeddings", 2048)
    norm = {"type": "rmsnorm", "scheme": "pre"}
    if model_type == "megamix":
        norm = {"type": fields.get("norm_type", "rmsnorm"), "layers": fields["layer_placements"],
                "deepnorm_alpha": fields.get("deepnorm_alpha", 1.0)}
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
        },
        "norm": norm,
        "data": {"seq_len": min(256, max_seq_len)},
    }
