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
     "qk_norm": "none", "v_norm": "none",
     "input_scale": 1.0, "residual_weight": 1.0}

naming the norm (a submodule of the layer, and its weight's name) in each slot of each sublayer F:

    h = F(before(x) * input_scale)  if a "before" norm, else F(x)
    h = output(h)                   if an "output" norm
    x = after(residual_weight * x + h)  if an "after" norm, else x + h

so Pre-LN is ``x + F(N(x))``, Post-LN ``N(x + F(x))``, LayerNorm Scaling scales the input norm by
1/√(ℓ+1), Peri-LN normalizes F's output too, DeepNorm weighs x by a = (2L)^¼.  ``qk_norm`` and
``v_norm`` (``none``, ``full``, ``per_head``; absent means none) normalize the attention's q and k,
or v, before RoPE (``self_attn.q_norm``, ``k_norm``, ``v_norm``): over the whole projection, or over
each head's ``head_dim`` features with one weight shared by the heads.  They are applied to the
projections' outputs by forward hooks, so attention itself, its KV cache and generation stay
transformers' own.

``config.norm_type`` is ``rmsnorm``, ``layernorm`` (with bias) or ``dyt`` (``weight ⊙ tanh(alpha ·
x) + bias``, alpha a learned scalar), ``config.rms_norm_eps`` the epsilon of every norm;
``config.embedding_scale`` multiplies the embedding by a learned scalar (``model.embed_scale``),
``config.embedding_norm`` puts a norm (``model.embed_norm``) on the (scaled) embedding, and a final
norm precedes the LM head.  Pre-LN and Post-LN layers use the Mix-LN reference code's weight names,
so its checkpoints and these exports are interchangeable.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, LlamaRMSNorm

NORM_TYPES = ("rmsnorm", "layernorm", "dyt")
SUBLAYERS = ("attention", "mlp")
SLOTS = ("before", "output", "after")
ATTENTION_NORMS = ("none", "full", "per_head")
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
    embedding_norm: bool = False
    embedding_scale: bool = False

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
            for key in ("qk_norm", "v_norm"):
                if row.get(key, "none") not in ATTENTION_NORMS:
                    raise ValueError(f"layer_norms[{index}].{key} must be one of {ATTENTION_NORMS}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}; got {self.norm_type!r}")


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025): ``weight ⊙ tanh(alpha · x) + bias``, alpha a learned scalar."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), 0.5))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = torch.tanh(self.alpha.float() * x.float()) * self.weight.float() + self.bias.float()
        return y.to(dtype)


class Scale(nn.Module):
    """``x · weight``, weight a learned scalar (the embedding's, with ``config.embedding_scale``)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def make_norm(config: MegamixConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=config.rms_norm_eps)
    if config.norm_type == "dyt":
        return DyT(dim)
    return LlamaRMSNorm(dim, eps=config.rms_norm_eps)


def normalize_projection(norm: nn.Module, form: str, head_dim: int):
    """A forward hook that normalizes a q, k or v projection's output: over all of it (``full``),
    or over each head's ``head_dim`` features (``per_head``)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if form == "full":
            return norm(output)
        return norm(output.unflatten(-1, (-1, head_dim))).flatten(-2)

    return hook


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
        attn = self.self_attn
        forms = {"q": row.get("qk_norm", "none"), "k": row.get("qk_norm", "none"), "v": row.get("v_norm", "none")}
        for name, form in forms.items():
            if form != "none":
                projection = getattr(attn, f"{name}_proj")
                norm = make_norm(config, projection.out_features if form == "full" else attn.head_dim)
                setattr(attn, f"{name}_norm", norm)
                projection.register_forward_hook(normalize_projection(norm, form, attn.head_dim))

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
        self.embed_scale = Scale() if config.embedding_scale else None
        self.embed_norm = make_norm(config) if config.embedding_norm else None
        self.norm = make_norm(config)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs):
        """Llama's forward; the embeddings (given or looked up) are first scaled, y0 = s·E[x], and
        normalized, y0 = N(E[x]), where the config says so."""
        if self.embed_scale is not None or self.embed_norm is not None:
            if inputs_embeds is None:
                inputs_embeds = self.embed_tokens(input_ids)
            if self.embed_scale is not None:
                inputs_embeds = self.embed_scale(inputs_embeds)
            if self.embed_norm is not None:
                inputs_embeds = self.embed_norm(inputs_embeds)
            input_ids = None
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


class MegamixForCausalLM(LlamaForCausalLM):
    config_class = MegamixConfig
    _no_split_modules: ClassVar[list[str]] = ["MegamixDecoderLayer"]

    def __init__(self, config: MegamixConfig):
        super().__init__(config)
        self.model = MegamixModel(config)
        self.post_init()
