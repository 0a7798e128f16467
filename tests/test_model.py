"""The model against independent references: the papers' formulas (docs/placements.md) written out by hand here, and
Hugging Face's LlamaForCausalLM for the Pre-LN LLaMA and its parameter counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from megamix.config import load_config, validate
from megamix.model import Block, Transformer, num_parameters

torch.manual_seed(0)


def per_layer_params(h, i, kv=None):
    kv = h if kv is None else kv
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; SwiGLU; two norms


@pytest.mark.parametrize("name,hidden,inter,layers,expected", [
    ("llama_7b", 4096, 11008, 32, 6_738_415_616),
    ("llama_1b", 2048, 5461, 24, None),
    ("llama_71m", 512, 1368, 12, None),
])
def test_paper_configs_count_the_spec_parameters(name, hidden, inter, layers, expected):
    by_formula = layers * per_layer_params(hidden, inter) + 2 * 32000 * hidden + hidden
    if expected is not None:
        assert by_formula == expected  # docs/recipes.md: 32 × 202,383,360 + 2 × 131,072,000 + 4,096
    cfg = validate(load_config(f"configs/{name}.yaml"))
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.norm)
    assert num_parameters(model) == by_formula


def test_parameter_count_matches_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5461, num_hidden_layers=24,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        reference = LlamaForCausalLM(hf)
        ours = Transformer(*_cfg(["model.hidden_size=2048", "model.intermediate_size=5461", "model.num_layers=24",
                                  "model.num_heads=32", "model.num_kv_heads=8"]))
    assert num_parameters(ours) == sum(p.numel() for p in reference.parameters())


def _cfg(overrides):
    cfg = validate(load_config(None, ["data.seq_len=8", *overrides]))
    return cfg.model, cfg.norm


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ln(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def attention_ref(block, x, cos, sin):
    """Causal multi-head attention with GQA, written independently of the model's code."""
    a = block.attention
    b, s, h = x.shape
    hd = a.head_dim
    q = (x @ a.q_proj.weight.T).view(b, s, -1, hd).transpose(1, 2)
    k = (x @ a.k_proj.weight.T).view(b, s, -1, hd).transpose(1, 2)
    v = (x @ a.v_proj.weight.T).view(b, s, -1, hd).transpose(1, 2)
    return rope_attend(q, k, v, cos, sin) @ a.o_proj.weight.T


def rope_attend(q, k, v, cos, sin):
    """RoPE on q and k ([batch, heads, seq, head_dim]), then causal GQA attention; [batch, seq, hidden]."""
    b, _, s, hd = q.shape

    def rot(t):  # pairs dimension j with j + hd/2 (the Hugging Face Llama layout)
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    q, k = rot(q), rot(k)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)


def mlp_ref(block, x):
    m = block.mlp
    return (F.silu(x @ m.gate_proj.weight.T) * (x @ m.up_proj.weight.T)) @ m.down_proj.weight.T


def block_ref(block, x, cos, sin, kind, layer_index, norm_type="rmsnorm", a=None):
    """The placement table (docs/placements.md), per sublayer F."""
    def N(name, t, scale=1.0):
        n = getattr(block, name)
        out = rms(t, n.weight) if norm_type == "rmsnorm" else ln(t, n.weight, n.bias)
        return out * scale

    attn = lambda t: attention_ref(block, t, cos, sin)  # noqa: E731
    mlp = lambda t: mlp_ref(block, t)  # noqa: E731
    for F_, norm, out_norm in ((attn, "attention_norm", "attention_out_norm"), (mlp, "mlp_norm", "mlp_out_norm")):
        if kind == "pre":
            x = x + F_(N(norm, x))
        elif kind == "post":
            x = N(norm, x + F_(x))
        elif kind == "lns":
            x = x + F_(N(norm, x) / math.sqrt(layer_index + 1))
        elif kind == "peri":
            x = x + N(out_norm, F_(N(norm, x)))
        elif kind == "deepnorm":
            x = N(norm, a * x + F_(x))
    return x


@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize(
    "kind,layer_index", [("pre", 0), ("post", 0), ("lns", 0), ("lns", 3), ("peri", 2), ("deepnorm", 1)]
)
def test_block_follows_the_spec_formula(kind, layer_index, norm_type):
    model_cfg, norm_cfg = _cfg(["model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2",
                                "model.intermediate_size=48", "model.num_layers=4", "model.max_seq_len=16",
                                f"norm.type={norm_type}"])
    block = Block(model_cfg, norm_cfg, layer_index, kind).double()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for p in block.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    from megamix.model.llama import rope_tables
    cos, sin = (t[:10].double() for t in rope_tables(8, 16, 10000.0))
    a = (2 * 4) ** 0.25
    expected = block_ref(block, x, cos, sin, kind, layer_index, norm_type, a)
    torch.testing.assert_close(Block.stream(*block(x, None, cos, sin)), expected, rtol=1e-10, atol=1e-10)


def test_the_fused_residual_path_equals_the_formulas_across_every_transition():
    """A model whose layers run through every scheme and every transition between them (the stream
    handed on pending or normalized): its logits and gradients equal the unfused formulas, in fp64."""
    schemes = ["pre", "post", "pre", "lns", "peri", "post", "deepnorm", "pre", "peri", "post"]
    model_cfg, norm_cfg = _cfg(["model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2",
                                "model.intermediate_size=48", f"model.num_layers={len(schemes)}",
                                "model.max_seq_len=16", "model.vocab_size=64", f"norm.layers=[{','.join(schemes)}]"])
    torch.manual_seed(0)
    model = Transformer(model_cfg, norm_cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    tokens = torch.randint(0, 64, (2, 10))
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    a = (2 * len(schemes)) ** 0.25

    def reference() -> torch.Tensor:
        x = model.embed_tokens(tokens)
        for i, scheme in enumerate(schemes):
            x = block_ref(model.layers[str(i)], x, cos, sin, scheme, i, a=a)
        return rms(x, model.norm.weight) @ model.lm_head.weight.T

    expected = reference()
    grads_expected = torch.autograd.grad(expected.square().mean(), list(model.parameters()))
    got = model(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(torch.autograd.grad(got.square().mean(), list(model.parameters())), grads_expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scheme", ["pre", "post", "lns", "peri", "deepnorm", "olmo2", "hybrid", "hybrid_star"])
def test_the_residual_stream_is_fp32_under_bf16_autocast_for_every_scheme(scheme):
    """One stream dtype for every scheme: Post-LN's normalized stream is not rounded to bf16."""
    model_cfg, norm_cfg = _cfg(["model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=48",
                                "model.num_layers=3", "model.max_seq_len=16", "model.vocab_size=64",
                                f"norm.scheme={scheme}"])
    model = Transformer(model_cfg, norm_cfg)
    seen = []
    for block in model.layers.values():
        block.register_forward_hook(lambda m, args, out: seen.append(Block.stream(*out).dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 64, (2, 8)))
    assert seen == [torch.float32] * 3 and logits.dtype == torch.bfloat16


def test_post_ln_layer_output_is_normalized_and_pre_ln_is_not():
    model_cfg, norm_cfg = _cfg(["model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=48",
                                "model.num_layers=2", "model.max_seq_len=16"])
    x = 5 * torch.randn(2, 8, 32)
    from megamix.model.llama import rope_tables
    cos, sin = (t[:8] for t in rope_tables(8, 16, 10000.0))
    post = Block.stream(*Block(model_cfg, norm_cfg, 0, "post")(x, None, cos, sin))
    pre = Block.stream(*Block(model_cfg, norm_cfg, 0, "pre")(x, None, cos, sin))
    torch.testing.assert_close(post.pow(2).mean(-1), torch.ones(2, 8), rtol=1e-4, atol=1e-4)
    assert (pre.pow(2).mean(-1) - 1).abs().max() > 1


def test_lns_scales_each_layers_norm_by_one_over_sqrt_layer():
    model_cfg, norm_cfg = _cfg(["model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=48",
                                "model.num_layers=8", "norm.scheme=lns"])
    model = Transformer(model_cfg, norm_cfg)
    for i, block in model.layers.items():
        assert block.attention_norm.scale == block.mlp_norm.scale == pytest.approx(1 / math.sqrt(int(i) + 1))
    assert model.norm.scale == 1.0


def test_pre_ln_model_equals_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    model_cfg, norm_cfg = _cfg(["model.vocab_size=100", "model.hidden_size=32", "model.num_heads=4",
                                "model.num_kv_heads=2", "model.intermediate_size=48", "model.num_layers=3",
                                "model.max_seq_len=64"])
    ours = Transformer(model_cfg, norm_cfg).eval()
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                      max_position_embeddings=64, tie_word_embeddings=False)).eval()
    names = {"attention.": "self_attn.", "attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    state = {}
    for k, v in ours.state_dict().items():
        hk = k if k.startswith("lm_head") else "model." + k
        for a, b in names.items():
            hk = hk.replace(a, b)
        state[hk] = v
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    tokens = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_one_matrix():
    model = Transformer(*_cfg(["model.hidden_size=32", "model.num_heads=4", "model.num_layers=2",
                               "model.tie_embeddings=true"]))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_init_follows_spec_std_and_deepnorm_gain():
    model = Transformer(*_cfg(["model.vocab_size=4000", "model.hidden_size=256", "model.num_heads=4",
                               "model.intermediate_size=512", "model.num_layers=2",
                               "norm.layers=[pre, deepnorm]"]))
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.layers["0"].attention.o_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.layers["0"].attention_norm.weight == 1)
    # xavier-normal: std = gain·sqrt(2 / (fan_in + fan_out)), gain (8L)^-1/4 on v, o, MLP; 1 on q, k
    gain = (8 * 2) ** -0.25
    up = model.layers["1"].mlp.up_proj.weight
    assert up.std().item() == pytest.approx(gain * math.sqrt(2 / (256 + 512)), rel=0.05)
    q = model.layers["1"].attention.q_proj.weight
    assert q.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)


# ----------------------------------------------------------------------------------------------
# The newer placements and norm types (docs/placements.md), against formulas written out here:
# OLMo 2's x + N(F(x)), HybridNorm's N(x + A(x)) then x + F(x) with q, k, v normalized per head,
# HybridNorm*'s first block, QK-norm over the whole projection or per head, V-norm, DyT, and
# Peri-LN's embedding norm.

def dyt(x, n):
    return torch.tanh(n.alpha * x) * n.weight + n.bias


def norm_ref(n, t, norm_type, scale=1.0):
    """One norm by its formula: RMSNorm, LayerNorm or DyT, over the last dimension."""
    if norm_type == "dyt":
        return dyt(t, n) * scale
    return (rms(t, n.weight) if norm_type == "rmsnorm" else ln(t, n.weight, n.bias)) * scale


def qkv_ref(block, x, cos, sin, norm_type, qk, v_form):
    """Attention with q, k (and v) normalized before RoPE: over the whole projection ("full") or
    over each head_dim slice with one shared weight ("per_head")."""
    a = block.attention
    b, s, h = x.shape
    hd = a.head_dim

    def project(w, norm, form):
        t = x @ w.T
        if form == "full":
            t = norm_ref(norm, t, norm_type)
        t = t.view(b, s, -1, hd)
        if form == "per_head":
            t = norm_ref(norm, t, norm_type)
        return t.transpose(1, 2)

    q = project(a.q_proj.weight, getattr(a, "q_norm", None), qk)
    k = project(a.k_proj.weight, getattr(a, "k_norm", None), qk)
    v = project(a.v_proj.weight, getattr(a, "v_norm", None), v_form)
    return rope_attend(q, k, v, cos, sin) @ a.o_proj.weight.T


# The q/k and v norms each scheme's paper uses (overridden where a case sets them).
PAPER_QKV = {"olmo2": ("full", "none"), "hybrid": ("per_head", "per_head"), "hybrid_first": ("per_head", "per_head")}


def new_block_ref(block, x, cos, sin, kind, norm_type, qk, v_form):
    def N(name, t):
        return norm_ref(getattr(block, name), t, norm_type)

    attn = lambda t: qkv_ref(block, t, cos, sin, norm_type, qk, v_form)  # noqa: E731
    mlp = lambda t: mlp_ref(block, t)  # noqa: E731
    if kind == "olmo2":  # x + N(F(x)) for both sublayers
        x = x + N("attention_out_norm", attn(x))
        return x + N("mlp_out_norm", mlp(x))
    if kind == "hybrid":  # Y = X + MHA_QKV(X); X' = N(Y) + FFN(N(Y))
        y = x + attn(x)
        z = N("attention_norm", y)
        return z + mlp(z)
    if kind in ("hybrid_first", "pre"):  # Pre-LN
        x = x + attn(N("attention_norm", x))
        return x + mlp(N("mlp_norm", x))
    if kind == "peri":
        x = x + N("attention_out_norm", attn(N("attention_norm", x)))
        return x + N("mlp_out_norm", mlp(N("mlp_norm", x)))
    if kind == "post":
        x = N("attention_norm", x + attn(x))
        return N("mlp_norm", x + mlp(x))
    raise ValueError(kind)


NEW_CASES = [  # (kind, norm type, qk_norm override, v_norm override)
    ("olmo2", "rmsnorm", None, None), ("olmo2", "layernorm", None, None), ("olmo2", "dyt", None, None),
    ("hybrid", "rmsnorm", None, None), ("hybrid", "dyt", None, None), ("hybrid_first", "layernorm", None, None),
    ("pre", "rmsnorm", "per_head", None), ("pre", "dyt", "full", "full"), ("peri", "rmsnorm", "full", "per_head"),
    ("post", "layernorm", "per_head", "full"), ("post", "dyt", None, None), ("hybrid", "rmsnorm", "none", "none"),
]


def _randomize_norms(module):
    """Non-trivial norm parameters, so a swapped or missing norm shows: weights and α in
    [0.5, 1.5], biases in [-0.2, 0.2]."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim <= 1:
                p.uniform_(-0.2, 0.2) if name.endswith("bias") else p.uniform_(0.5, 1.5)


def _small(overrides, layers=4):
    return _cfg(["model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=48",
                 f"model.num_layers={layers}", "model.max_seq_len=16", "model.vocab_size=64", *overrides])


@pytest.mark.parametrize("kind,norm_type,qk,v", NEW_CASES)
def test_new_placements_and_norm_types_follow_their_formulas(kind, norm_type, qk, v):
    overrides = [f"norm.type={norm_type}"] + [f"norm.{k}={val}" for k, val in (("qk_norm", qk), ("v_norm", v)) if val]
    model_cfg, norm_cfg = _small(overrides)
    block = Block(model_cfg, norm_cfg, 1, kind).double()
    _randomize_norms(block)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    from megamix.model.llama import rope_tables
    cos, sin = (t[:10].double() for t in rope_tables(8, 16, 10000.0))
    paper = PAPER_QKV.get(kind, ("none", "none"))
    qk_form, v_form = qk or paper[0], v or paper[1]
    assert {n: getattr(block.attention, n).weight.shape[0] for n in ("q_norm", "k_norm", "v_norm")
            if hasattr(block.attention, n)} == {
        **({"q_norm": 32 if qk_form == "full" else 8, "k_norm": 16 if qk_form == "full" else 8}
           if qk_form != "none" else {}),
        **({"v_norm": 16 if v_form == "full" else 8} if v_form != "none" else {})}
    expected = new_block_ref(block, x, cos, sin, kind, norm_type, qk_form, v_form)
    torch.testing.assert_close(Block.stream(*block(x, None, cos, sin)), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm_type", ["rmsnorm", "dyt"])
def test_a_model_of_the_new_placements_with_an_embedding_norm_equals_the_formulas(norm_type):
    """Logits and gradients of a model running through the new schemes and their transitions (the
    stream handed on pending or normalized), with Peri-LN's y0 = N(E[x]), in fp64."""
    schemes = ["hybrid_first", "hybrid", "olmo2", "post", "hybrid", "pre", "olmo2", "peri"]
    model_cfg, norm_cfg = _small([f"norm.type={norm_type}", f"norm.layers=[{','.join(schemes)}]",
                                  "norm.embedding_norm=true"], layers=len(schemes))
    torch.manual_seed(0)
    model = Transformer(model_cfg, norm_cfg).double()
    _randomize_norms(model)
    tokens = torch.randint(0, 64, (2, 10))
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]

    def reference() -> torch.Tensor:
        x = norm_ref(model.embed_norm, model.embed_tokens(tokens), norm_type)
        for i, scheme in enumerate(schemes):
            qk, v = PAPER_QKV.get(scheme, ("none", "none"))
            x = new_block_ref(model.layers[str(i)], x, cos, sin, scheme, norm_type, qk, v)
        return norm_ref(model.norm, x, norm_type) @ model.lm_head.weight.T

    expected = reference()
    params = list(model.parameters())
    grads_expected = torch.autograd.grad(expected.square().mean(), params)
    got = model(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(torch.autograd.grad(got.square().mean(), params), grads_expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind,norm_type,qk,v", [
    ("olmo2", "rmsnorm", None, None), ("hybrid", "layernorm", None, None), ("hybrid_first", "dyt", None, None),
    ("peri", "dyt", "full", "per_head"),
])
def test_gradients_of_the_new_blocks_pass_gradcheck(kind, norm_type, qk, v):
    """Autograd's gradients of a small fp64 block, w.r.t. its input and every norm parameter (DyT's
    α included), against finite differences."""
    from torch.func import functional_call

    from megamix.model.llama import rope_tables

    overrides = [f"norm.type={norm_type}"] + [f"norm.{k}={val}" for k, val in (("qk_norm", qk), ("v_norm", v)) if val]
    model_cfg, norm_cfg = _cfg(["model.hidden_size=8", "model.num_heads=2", "model.num_kv_heads=1",
                                "model.intermediate_size=12", "model.num_layers=2", "model.max_seq_len=8", *overrides])
    torch.manual_seed(0)
    block = Block(model_cfg, norm_cfg, 1, kind).double()
    _randomize_norms(block)
    names = [n for n, p in block.named_parameters() if p.ndim <= 1]
    cos, sin = (t[:3].double() for t in rope_tables(4, 8, 10000.0))
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    norm_params = [block.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def f(x, *values):
        return Block.stream(*functional_call(block, dict(zip(names, values)), (x, None, cos, sin)))

    assert torch.autograd.gradcheck(f, (x, *norm_params), eps=1e-6, atol=1e-5)


def test_dyt_starts_from_the_papers_alpha_for_attention_and_the_rest():
    """DyT's α0 for LLaMA (Zhu et al. 2025, the authors' LLaMA code): one value for the attention
    block's norms (and q, k, v), another for the MLP's, the final and the embedding norm."""
    model = Transformer(*_small(["norm.type=dyt", "norm.layers=[peri,olmo2,post,hybrid]", "norm.embedding_norm=true"]))
    alphas = {name: p.item() for name, p in model.named_parameters() if name.endswith("alpha")}
    for name, value in alphas.items():
        expected = 0.8 if "attention" in name else 0.2
        assert value == pytest.approx(expected), name
    assert {"layers.1.attention.q_norm.alpha", "layers.3.attention.v_norm.alpha", "embed_norm.alpha",
            "norm.alpha", "layers.0.mlp_out_norm.alpha"} <= alphas.keys()
    model = Transformer(*_small(["norm.type=dyt", "norm.dyt_alpha_attention=0.6", "norm.dyt_alpha_other=0.15"]))
    assert model.layers["2"].attention_norm.alpha.item() == pytest.approx(0.6)
    assert model.layers["2"].mlp_norm.alpha.item() == model.norm.alpha.item() == pytest.approx(0.15)


def test_the_embedding_scale_starts_at_sqrt_d_and_multiplies_the_embedding():
    """``model.embedding_scale`` (the DyT authors' LLaMA): y0 = s · E[x] with a learned scalar s,
    s0 = √d.  The reference is the same model without the scale whose table is s · E: equal
    logits, and dL/ds = Σ dL/d(sE) ⊙ E over the table (the chain rule, written here)."""
    scaled = Transformer(*_small(["model.embedding_scale=true", "norm.type=dyt", "norm.scheme=peri",
                                  "norm.embedding_norm=true"])).double()
    assert scaled.embed_scale.weight.item() == pytest.approx(math.sqrt(32))
    plain = Transformer(*_small(["norm.type=dyt", "norm.scheme=peri", "norm.embedding_norm=true"])).double()
    with torch.no_grad():
        scaled.embed_scale.weight.fill_(1.7)
        plain.load_state_dict({k: v for k, v in scaled.state_dict().items() if not k.startswith("embed_scale.")})
        plain.embed_tokens.weight.mul_(1.7)
    tokens = torch.randint(0, 64, (2, 12))
    targets = torch.randint(0, 64, (2, 12))
    losses = [F.cross_entropy(m(tokens).flatten(0, 1), targets.flatten()) for m in (scaled, plain)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for loss in losses:
        loss.backward()
    want = (plain.embed_tokens.weight.grad * scaled.embed_tokens.weight.detach()).sum()
    torch.testing.assert_close(scaled.embed_scale.weight.grad[0], want, rtol=1e-10, atol=1e-12)
    assert "embed_scale.weight" not in dict(Transformer(*_small([])).named_parameters())
