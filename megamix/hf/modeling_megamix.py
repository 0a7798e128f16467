"""A LLaMA whose blocks choose their norm placement layer by layer, for Hugging Face transformers.

This file is shipped inside every megamix export whose layers are not all plain Pre-LN; it is
loaded with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.  It stands
alone: it needs transformers (>= 5) and torch, never megamix.

Attention, MLP, rotary embeddings, KV cache and generation are transformers' own Llama code; only
where the norms sit changes.  ``config.layer_placements`` holds one kind per layer (global index
ℓ, N a norm, F the attention or MLP sublayer):

- ``pre``:      x = x + F(N(x))                     (standard LLaMA)
- ``post``:     x = N(x + F(x))                     (original Transformer)
- ``lns``:      x = x + F(N(x) / sqrt(ℓ + 1))       (LayerNorm Scaling)
- ``peri``:     x = x + N_out(F(N_in(x)))           (Peri-LN)
- ``deepnorm``: x = N(a·x + F(x)), a = config.deepnorm_alpha

``config.norm_type`` is ``rmsnorm`` or ``layernorm`` (with bias); ``config.rms_norm_eps`` is the
epsilon of every norm of either type.  A final norm precedes the LM head in every scheme.

Weight names of layer ℓ's norms (``model.layers.ℓ.<name>``) by kind.  Pre-LN and Post-LN use the
names of the Mix-LN reference code, so its checkpoints and these exports are interchangeable:

- ``pre``, ``lns``: ``input_layernorm`` (before attention), ``post_attention_layernorm`` (before the MLP);
- ``post``, ``deepnorm``: ``post_attention_layernorm`` (after the attention add),
  ``post_feedforward_layernorm`` (after the MLP add);
- ``peri`` (Gemma 2's names): ``input_layernorm`` and ``post_attention_layernorm`` (before and on
  the output of attention), ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm`` (the MLP's).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, LlamaRMSNorm

PLACEMENTS = ("pre", "post", "lns", "peri", "deepnorm")
NORM_TYPES = ("rmsnorm", "layernorm")

# For each kind, the norms of the attention and the MLP sublayer as (before F, on F's output,
# after the residual add); None where the kind has no such norm.
SUBLAYER_NORMS = {
    "pre": (("input_layernorm", None, None), ("post_attention_layernorm", None, None)),
    "lns": (("input_layernorm", None, None), ("post_attention_layernorm", None, None)),
    "peri": (
        ("input_layernorm", "post_attention_layernorm", None),
        ("pre_feedforward_layernorm", "post_feedforward_layernorm", None),
    ),
    "post": ((None, None, "post_attention_layernorm"), (None, None, "post_feedforward_layernorm")),
    "deepnorm": ((None, None, "post_attention_layernorm"), (None, None, "post_feedforward_layernorm")),
}


class MegamixConfig(LlamaConfig):
    """LlamaConfig plus where each layer's norms go."""

    model_type = "megamix"

    layer_placements: list[str] | None = None  # None: every layer "pre"
    norm_type: str = "rmsnorm"
    deepnorm_alpha: float = 1.0  # residual weight a of "deepnorm" layers

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.layer_placements is None:
            self.layer_placements = ["pre"] * self.num_hidden_layers
        if len(self.layer_placements) != self.num_hidden_layers:
            raise ValueError(
                f"layer_placements has {len(self.layer_placements)} entries for {self.num_hidden_layers} layers"
            )
        unknown = sorted(set(self.layer_placements) - set(PLACEMENTS))
        if unknown:
            raise ValueError(f"unknown layer placements {unknown}; expected {PLACEMENTS}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}; got {self.norm_type!r}")


def make_norm(config: MegamixConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MegamixDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer with this layer's norm placement (see the module docstring)."""

    def __init__(self, config: MegamixConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.placement = config.layer_placements[layer_idx]
        del self.input_layernorm, self.post_attention_layernorm  # re-created below where the kind has them
        self.attention_norms, self.mlp_norms = SUBLAYER_NORMS[self.placement]
        for name in self.attention_norms + self.mlp_norms:
            if name is not None:
                setattr(self, name, make_norm(config))
        self.input_scale = 1.0 / math.sqrt(layer_idx + 1) if self.placement == "lns" else 1.0
        self.residual_weight = config.deepnorm_alpha if self.placement == "deepnorm" else 1.0

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

        hidden_states = self.sublayer(hidden_states, attention, self.attention_norms)
        return self.sublayer(hidden_states, self.mlp, self.mlp_norms)

    def sublayer(self, x: torch.Tensor, f, norms: tuple[str | None, str | None, str | None]) -> torch.Tensor:
        before, output, after = (getattr(self, name) if name else None for name in norms)
        h = f(before(x) * self.input_scale if self.input_scale != 1.0 else before(x)) if before else f(x)
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
