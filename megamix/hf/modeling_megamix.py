"""A LLaMA whose blocks choose their norm placement layer by layer, for Hugging Face transformers.

This file is shipped inside every megamix export whose layers are not all plain Pre-LN; it is
loaded with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.  It stands
alone: it needs transformers (>= 5) and torch, never megamix, and it is the same file for every
export (megamix can check an export's copy byte for byte against its own).

Attention, MLP, rotary embeddings, KV cache and generation are transformers' own Llama code; only
where the norms sit changes, and that is data: ``config.layer_norms`` holds one row per layer,

    {"scheme": "post",
     "attention": {"before": null, "output": null, "after": "post_attention_layernorm"},
     "mlp":       {"before": null, "output": null, "after": "post_feedforward_layernorm"},
     "input_scale": 1.0, "residual_weight": 1.0}

naming the norm (a submodule of the layer, and its weight's name) in each slot of each sublayer F:

    h = F(before(x) * input_scale)  if a "before" norm, else F(x)
    h = output(h)                   if an "output" norm
    x = after(residual_weight * x + h)  if an "after" norm, else x + h

so Pre-LN is ``x + F(N(x))``, Post-LN ``N(x + F(x))``, LayerNorm Scaling scales the input norm by
1/√(ℓ+1), Peri-LN normalizes F's output too, DeepNorm weighs x by a = (2L)^¼.  ``config.norm_type``
is ``rmsnorm`` or ``layernorm`` (with bias), ``config.rms_norm_eps`` the epsilon of every norm; a
final norm precedes the LM head.  Pre-LN and Post-LN layers use the Mix-LN reference code's
weight names, so its checkpoints and these exports are interchangeable.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, LlamaRMSNorm

NORM_TYPES = ("rmsnorm", "layernorm")
SUBLAYERS = ("attention", "mlp")
SLOTS = ("before", "output", "after")
PRE_LN_ROW = {
    "scheme": "pre",
    "attention": {"before": "input_layernorm", "output": None, "after": None},
    "mlp": {"before": "post_attention_layernorm", "output": None, "after": None},
    "input_scale": 1.0,
    "residual_weight": 1.0,
}


class MegamixConfig(LlamaConfig):
    """LlamaConfig plus where each layer's norms go (``layer_norms``, see the module docstring)."""

    model_type = "megamix"

    layer_norms: list[dict] | None = None  # None: every layer Pre-LN
    layer_schemes: list[str] | None = None  # the rows' scheme names, for people reading config.json
    norm_type: str = "rmsnorm"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.layer_norms is None:
            self.layer_norms = [PRE_LN_ROW] * self.num_hidden_layers
        if len(self.layer_norms) != self.num_hidden_layers:
            raise ValueError(f"layer_norms has {len(self.layer_norms)} rows for {self.num_hidden_layers} layers")
        for index, row in enumerate(self.layer_norms):
            for sublayer in SUBLAYERS:
                if set(row.get(sublayer, {})) != set(SLOTS):
                    raise ValueError(f"layer_norms[{index}].{sublayer} must name the slots {SLOTS}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}; got {self.norm_type!r}")


def make_norm(config: MegamixConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MegamixDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer with this layer's norms (its row of ``config.layer_norms``)."""

    def __init__(self, config: MegamixConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        row = config.layer_norms[layer_idx]
        del self.input_layernorm, self.post_attention_layernorm  # re-created below where the row names them
        self.norm_names = {sublayer: tuple(row[sublayer][slot] for slot in SLOTS) for sublayer in SUBLAYERS}
        for names in self.norm_names.values():
            for name in names:
                if name is not None:
                    setattr(self, name, make_norm(config))
        self.input_scale = float(row["input_scale"])
        self.residual_weight = float(row["residual_weight"])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # The KV cache and its flags arrive in ``kwargs`` under whatever names this transformers
        # version uses (``past_key_values`` before 5.x, ``cache`` after) and go to attention as given.
        def attention(h: torch.Tensor) -> torch.Tensor:
            return self.self_attn(
                hidden_states=h,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **kwargs,
            )[0]

        hidden_states = self.sublayer(hidden_states, attention, self.norm_names["attention"])
        return self.sublayer(hidden_states, self.mlp, self.norm_names["mlp"])

    def sublayer(self, x: torch.Tensor, f, names: tuple[str | None, str | None, str | None]) -> torch.Tensor:
        before, output, after = (getattr(self, name) if name else None for name in names)
        if before is not None:
            h = before(x)
            h = f(h * self.input_scale if self.input_scale != 1.0 else h)
        else:
            h = f(x)
        if output is not None:
            h = output(h)
        if after is not None:
            return after(self.residual_weight * x + h if self.residual_weight != 1.0 else x + h)
        return x + h


class MegamixModel(LlamaModel):
    config_class = MegamixConfig
    _no_split_modules: ClassVar[list[str]] = ["MegamixDecoderLayer"]

    def __init__(self, config: MegamixConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(MegamixDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.post_init()


class MegamixForCausalLM(LlamaForCausalLM):
    config_class = MegamixConfig
    _no_split_modules: ClassVar[list[str]] = ["MegamixDecoderLayer"]

    def __init__(self, config: MegamixConfig):
        super().__init__(config)
        self.model = MegamixModel(config)
        self.post_init()
