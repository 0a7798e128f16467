"""A LLaMA whose blocks choose their norm placement layer by layer.

Read it top to bottom: rotary embeddings, attention (GQA through ``scaled_dot_product_attention``),
the SwiGLU MLP, the block — one class that reads its placement from
:func:`megamix.model.placement.layer_placements` — and the model.  Nothing here knows about
parallelism: tensor, pipeline and data parallelism are applied to this model from outside by
``megamix.parallel``.  (Two concessions to pipelining, as in torchtitan: layers live in a
``ModuleDict`` keyed by the global layer index so names survive splitting, and the embedding,
final norm and head may be ``None`` on stages that do not hold them.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megamix.config import ModelConfig, NormConfig
from megamix.model.norms import Norm
from megamix.model.placement import deepnorm_constants, layer_placements


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, ``[max_seq_len, head_dim]``, in the half-split layout
    Hugging Face's Llama uses (dimension i pairs with i + head_dim/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[batch, heads, seq, head_dim]`` by the angles of its positions."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads.
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Attention and MLP sublayers, each wrapped by the norm placement of this layer.

    ``attention_norm``/``mlp_norm`` is the sublayer's norm: before the sublayer (pre, lns, peri's
    input norm) or after the residual add (post, deepnorm).  Peri-LN adds ``*_out_norm`` on the
    sublayer's output.
    """

    def __init__(self, cfg: ModelConfig, norm: NormConfig, layer_index: int, placement: str):
        super().__init__()
        self.layer_index = layer_index  # global: the same on every pipeline layout
        self.placement = placement
        scale = 1.0 / math.sqrt(layer_index + 1) if placement == "lns" else 1.0

        def make_norm(scale: float = 1.0) -> Norm:
            return Norm(cfg.hidden_size, norm.type, cfg.norm_eps, scale)

        self.attention_norm = make_norm(scale)
        self.attention = Attention(cfg)
        self.mlp_norm = make_norm(scale)
        self.mlp = MLP(cfg)
        self.attention_out_norm = make_norm() if placement == "peri" else None
        self.mlp_out_norm = make_norm() if placement == "peri" else None
        self.residual_weight = deepnorm_constants(norm, cfg.num_layers)[0] if placement == "deepnorm" else 1.0

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.sublayer(x, lambda h: self.attention(h, cos, sin), self.attention_norm, self.attention_out_norm)
        x = self.sublayer(x, self.mlp, self.mlp_norm, self.mlp_out_norm)
        return x

    def sublayer(self, x, f, norm: Norm, out_norm: Norm | None) -> torch.Tensor:
        if self.placement in ("pre", "lns"):  # lns: the norm carries the 1/sqrt(ℓ+1) scale
            return x + f(norm(x))
        if self.placement == "peri":
            return x + out_norm(f(norm(x)))
        if self.placement == "post":
            return norm(f(x), residual=x)  # N(x + F(x))
        if self.placement == "deepnorm":
            return norm(f(x), residual=self.residual_weight * x)  # N(a·x + F(x))
        raise ValueError(f"unknown placement {self.placement!r}")


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, norm: NormConfig):
        super().__init__()
        self.cfg, self.norm_cfg = cfg, norm
        self.placements = layer_placements(norm, cfg.num_layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): Block(cfg, norm, i, kind) for i, kind in enumerate(self.placements)}
        )
        self.norm = Norm(cfg.hidden_size, norm.type, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[batch, seq]`` → logits ``[batch, seq, vocab]``.

        On a pipeline stage without the embedding the input is hidden states, and without the head
        the output is hidden states.
        """
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        seq = h.shape[1]
        cos, sin = self.rope_cos[:seq].to(h.dtype), self.rope_sin[:seq].to(h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        h = self.norm(h) if self.norm is not None else h
        return self.lm_head(h) if self.lm_head is not None else h

    @torch.no_grad()
    def init_weights(self) -> None:
        """SPEC.md's init: N(0, init_std²) for linear and embedding weights, 1 for norms;
        DeepNet's xavier-normal with gain b on v, o and the MLP for DeepNorm layers.  Also
        (re)computes the rotary tables, so a model built on the meta device can be materialized
        with ``to_empty`` and then initialized."""
        cfg = self.cfg
        if self.embed_tokens is not None:
            nn.init.normal_(self.embed_tokens.weight, std=cfg.embed_init_std or cfg.init_std)
        if self.lm_head is not None and not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.scaled_init else cfg.init_std
        _, deepnorm_gain = deepnorm_constants(self.norm_cfg, cfg.num_layers)
        for block in self.layers.values():
            attn, mlp = block.attention, block.mlp
            if block.placement == "deepnorm":
                for w in (attn.q_proj, attn.k_proj):
                    nn.init.xavier_normal_(w.weight, gain=1.0)
                for w in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                    nn.init.xavier_normal_(w.weight, gain=deepnorm_gain)
            else:
                for w in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                    nn.init.normal_(w.weight, std=cfg.init_std)
                for w in (attn.o_proj, mlp.down_proj):
                    nn.init.normal_(w.weight, std=out_std)
            for norm in (block.attention_norm, block.mlp_norm, block.attention_out_norm, block.mlp_out_norm):
                if norm is not None:
                    norm.reset_parameters()
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
