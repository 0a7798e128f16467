"""A LLaMA whose blocks choose their norm placement layer by layer.

Read it top to bottom: rotary embeddings, attention (GQA through ``scaled_dot_product_attention``,
with optional norms on q, k and v), the SwiGLU MLP, the block — one class that reads where its
norms go from its layer scheme's row in :data:`megamix.schemes.SCHEMES` — and the model.  Nothing
here knows about parallelism: tensor, pipeline and data parallelism are applied to this model from
outside by ``megamix.parallel``.  (Two concessions to pipelining, as in torchtitan: layers live in a
``ModuleDict`` keyed by the global layer index so names survive splitting, and the embedding, its
scale and norm, the final norm and the head may be ``None`` on stages that do not hold them.  One
to tensor parallelism: a norm on q, k or v may be handed a ``split`` saying how its features are
divided.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megamix.config import ModelConfig, NormConfig
from megamix.model.norms import Norm
from megamix.schemes import SCHEMES, SLOTS, attention_norms, deepnorm_constants, layer_schemes, norm_attribute


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
    """Causal self-attention.  ``qk_norm`` and ``v_norm`` (``none``, ``full``, ``per_head``) put a
    norm on q and k, or on v, before RoPE: ``full`` over the whole projection (OLMo 2), ``per_head``
    over each head's features with one weight shared by the heads (Qwen3, Gemma 3, HybridNorm)."""

    def __init__(self, cfg: ModelConfig, qk_norm: str = "none", v_norm: str = "none", norm_type: str = "rmsnorm",
                 dyt_alpha: float = 0.5):
        super().__init__()
        self.head_dim = cfg.head_dim
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.forms = {"q_norm": qk_norm, "k_norm": qk_norm, "v_norm": v_norm}
        for name, width in (("q_norm", cfg.hidden_size), ("k_norm", kv_dim), ("v_norm", kv_dim)):
            if self.forms[name] != "none":
                dim = width if self.forms[name] == "full" else cfg.head_dim
                setattr(self, name, Norm(dim, norm_type, cfg.norm_eps, alpha=dyt_alpha))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = self.heads(self.q_proj(x), "q_norm")
        k = self.heads(self.k_proj(x), "k_norm")
        v = self.heads(self.v_proj(x), "v_norm")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attend(q, k, v)
        return self.o_proj(y.transpose(1, 2).flatten(2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ/√d, causal) v over ``[batch, heads, seq, head_dim]`` (k and v may have fewer
        heads: grouped-query attention).  Its own method so instruments can watch q and k."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    def heads(self, t: torch.Tensor, norm: str) -> torch.Tensor:
        """A projection ``[batch, seq, heads·head_dim]`` → ``[batch, heads, seq, head_dim]``, with its
        norm (if any) over the whole projection or over each head.  Heads are -1: under tensor
        parallelism each rank holds only its share of them."""
        form = self.forms[norm]
        if form == "full":
            t = getattr(self, norm)(t)
        t = t.unflatten(-1, (-1, self.head_dim))
        if form == "per_head":
            t = getattr(self, norm)(t)
        return t.transpose(1, 2)


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
    """Attention and MLP sublayers, each wrapped by the norms of this layer's scheme.

    The scheme's row (:data:`megamix.schemes.SCHEMES`) says which norms a sublayer has: ``before``
    it (F(N(x)), scaled by the row's input scale), on its ``output`` (N(F(·))) and ``after`` the
    residual add (N(a·x + F(·)), a the row's residual weight).  Pre-LN has ``attention_norm`` before
    attention; Post-LN has it after the add; Peri-LN adds ``attention_out_norm`` (see
    :func:`megamix.schemes.norm_attribute`), and likewise for the MLP.

    The residual stream x travels as ``(residual, pending)`` with x = residual + pending: a
    sublayer without an ``after`` norm hands on its output F(·) still *pending*, and the next norm
    adds it to the stream in the same fused op that normalizes the sum (Pre-LN's x + F(N(x))
    followed by the next N(x) is one read of the stream, as in flash-attn's "prenorm" layer norm).
    A Post-LN sublayer hands on N(x + F(x)) with nothing pending.  :meth:`stream` gives x itself:
    what the layer analysis and the per-layer statistics look at.
    """

    def __init__(self, cfg: ModelConfig, norm: NormConfig, layer_index: int, scheme: str):
        super().__init__()
        self.layer_index = layer_index  # global: the same on every pipeline layout
        self.scheme = scheme
        row = SCHEMES[scheme]
        input_scale = row.input_scale(layer_index, cfg.num_layers, norm)
        self.residual_weight = row.residual_weight(layer_index, cfg.num_layers, norm)
        qk_norm, v_norm = attention_norms(norm, scheme)
        attention = Attention(cfg, qk_norm, v_norm, norm.type, dyt_alpha=norm.dyt_alpha_attention)
        self.norm_names: dict[str, tuple[str | None, ...]] = {}
        for sublayer, module in (("attention", attention), ("mlp", MLP(cfg))):
            names = {slot: norm_attribute(row, sublayer, slot) for slot in row.norms(sublayer).slots()}
            alpha = norm.dyt_alpha_attention if sublayer == "attention" else norm.dyt_alpha_other
            for slot, name in names.items():
                scale = input_scale if slot == "before" else 1.0
                setattr(self, name, Norm(cfg.hidden_size, norm.type, cfg.norm_eps, scale, alpha))
            setattr(self, sublayer, module)
            self.norm_names[sublayer] = tuple(names.get(slot) for slot in SLOTS)

    def forward(self, residual: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stream in as ``(residual, pending)``, out the same way (see the class docstring)."""
        residual, pending = self.sublayer(residual, pending, "attention", lambda h: self.attention(h, cos, sin))
        return self.sublayer(residual, pending, "mlp", self.mlp)

    def sublayer(self, residual: torch.Tensor, pending: torch.Tensor | None, name: str,
                 f) -> tuple[torch.Tensor, torch.Tensor | None]:
        before, output, after = (getattr(self, n) if n else None for n in self.norm_names[name])
        if before is not None:
            h, x = before.add_norm(pending, residual)  # x = residual + pending, h = N(x): one fused op
            h = f(h)
        else:
            x = self.stream(residual, pending)
            h = f(x)
        if output is not None:
            h = output(h)
        if after is not None:  # N(a·x + h), in the stream's dtype: nothing pending
            a = self.residual_weight
            return after.add_norm(h, x if a == 1.0 else a * x, out_dtype=x.dtype)[0], None
        return x, h  # x + h, the add left to the next norm

    @staticmethod
    def stream(residual: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        """The residual stream itself, x = residual + pending."""
        return residual if pending is None else residual + pending

    def norms(self) -> list[Norm]:
        """Every norm of the block, those on q, k and v included."""
        return [m for m in self.modules() if isinstance(m, Norm)]


class Scale(nn.Module):
    """A learned scalar multiplier (``model.embedding_scale``: the embedding times s, s₀ = √d)."""

    def __init__(self, init: float):
        super().__init__()
        self.init = init
        self.weight = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, norm: NormConfig):
        super().__init__()
        self.cfg, self.norm_cfg = cfg, norm
        self.schemes = layer_schemes(norm, cfg.num_layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = Scale(math.sqrt(cfg.hidden_size)) if cfg.embedding_scale else None
        # Peri-LN's y0 = N(E[x]); on the first pipeline stage, with the embedding.
        self.embed_norm = (Norm(cfg.hidden_size, norm.type, cfg.norm_eps, alpha=norm.dyt_alpha_other)
                           if norm.embedding_norm else None)
        self.layers = nn.ModuleDict(
            {str(i): Block(cfg, norm, i, scheme) for i, scheme in enumerate(self.schemes)}
        )
        self.norm = Norm(cfg.hidden_size, norm.type, cfg.norm_eps, alpha=norm.dyt_alpha_other)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.stream_dtype = torch.float32  # the stream's dtype (at least), fp32 under mixed precision; bf16_pure: bf16
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[batch, seq]`` → logits ``[batch, seq, vocab]``.

        On a pipeline stage without the embedding the input is the residual stream, and without the
        head the output is the residual stream.  The stream is kept in ``stream_dtype`` (fp32
        under mixed precision too, whatever the scheme), the sublayers compute in autocast's dtype.
        """
        x = self.embed(tokens) if self.embed_tokens is not None else tokens
        residual, pending = x.to(torch.promote_types(x.dtype, self.stream_dtype)), None
        seq = x.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        for layer in self.layers.values():
            residual, pending = layer(residual, pending, cos, sin)
        if self.norm is None:
            return Block.stream(residual, pending)
        h, _ = self.norm.add_norm(pending, residual)
        return self.lm_head(h) if self.lm_head is not None else h

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream entering layer 0: the embedding (scaled with
        ``model.embedding_scale``, normalized with ``norm.embedding_norm``), in ``stream_dtype`` at least."""
        x = self.embed_tokens(tokens)
        x = x.to(torch.promote_types(x.dtype, self.stream_dtype))
        if self.embed_scale is not None:
            x = self.embed_scale(x)
        return self.embed_norm(x) if self.embed_norm is not None else x

    @torch.no_grad()
    def init_weights(self) -> None:
        """Weights from N(0, init_std²) (output projections scaled by 1/√(2L) with
        ``model.scaled_init``), norms to 1; a scheme whose row says ``init: deepnet`` uses DeepNet's
        xavier-normal instead (docs/placements.md).  Also (re)computes the rotary tables, so a model
        built on the meta device can be materialized with ``to_empty`` and then initialized."""
        cfg = self.cfg
        if self.embed_tokens is not None:
            nn.init.normal_(self.embed_tokens.weight, std=cfg.embed_init_std or cfg.init_std)
        if self.lm_head is not None and not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        for module in (self.embed_scale, self.embed_norm, self.norm):
            if module is not None:
                module.reset_parameters()
        for block in self.layers.values():
            INIT_RULES[SCHEMES[block.scheme].init](block, cfg, self.norm_cfg)
            for norm in block.norms():
                norm.reset_parameters()
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


def init_normal(block: Block, cfg: ModelConfig, norm: NormConfig) -> None:
    """N(0, init_std²); the output projections (o, down) with std init_std/√(2L) under ``scaled_init``."""
    attn, mlp = block.attention, block.mlp
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.scaled_init else cfg.init_std
    for w in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
        nn.init.normal_(w.weight, std=cfg.init_std)
    for w in (attn.o_proj, mlp.down_proj):
        nn.init.normal_(w.weight, std=out_std)


def init_deepnet(block: Block, cfg: ModelConfig, norm: NormConfig) -> None:
    """DeepNet: xavier-normal with gain 1 on q and k, gain b = (8L)^-¼ on v, o and the MLP."""
    attn, mlp = block.attention, block.mlp
    _, gain = deepnorm_constants(norm, cfg.num_layers)
    for w in (attn.q_proj, attn.k_proj):
        nn.init.xavier_normal_(w.weight, gain=1.0)
    for w in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        nn.init.xavier_normal_(w.weight, gain=gain)


INIT_RULES = {"normal": init_normal, "deepnet": init_deepnet}  # a scheme row's ``init`` names one


def layer_of(name: str) -> int | None:
    """The global layer index of a parameter name (``layers.12.mlp.up_proj.weight`` → 12), None for
    the embedding, final norm and head; every per-layer statistic reads names through this."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" else None


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
