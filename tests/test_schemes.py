"""Per-layer norm schemes against the papers (docs/placements.md): Mix-LN makes layers ℓ < ⌊α·L⌋
Post-LN, the rest Pre-LN; and a new scheme is one row of the table."""

import json

import pytest
import torch

from megamix.config import NormConfig
from megamix.model.llama import rope_tables
from megamix.schemes import attention_norms, deepnorm_constants, layer_schemes, post_ln_layers

# (alpha, layers) → number of Post-LN layers, written out from the papers' statements.
EXPECTED_POST = {
    (0.0, 12): 0, (0.25, 12): 3, (0.5, 12): 6, (1.0, 12): 12,
    (0.0, 32): 0, (0.25, 32): 8, (0.5, 32): 16, (1.0, 32): 32,
    (0.25, 24): 6, (0.0625, 32): 2, (0.29, 100): 29,
}


@pytest.mark.parametrize("alpha,layers", sorted(EXPECTED_POST))
def test_mix_makes_the_first_floor_alpha_L_layers_post_ln(alpha, layers):
    n = EXPECTED_POST[(alpha, layers)]
    assert layer_schemes(NormConfig(scheme="mix", alpha=alpha), layers) == ["post"] * n + ["pre"] * (layers - n)


def test_mix_alpha_zero_is_pre_and_one_is_post():
    assert layer_schemes(NormConfig(scheme="mix", alpha=0.0), 12) == layer_schemes(NormConfig(scheme="pre"), 12)
    assert layer_schemes(NormConfig(scheme="mix", alpha=1.0), 12) == layer_schemes(NormConfig(scheme="post"), 12)


@pytest.mark.parametrize("scheme", ["pre", "post", "lns", "peri", "deepnorm", "olmo2", "hybrid"])
def test_uniform_schemes_apply_to_every_layer(scheme):
    assert layer_schemes(NormConfig(scheme=scheme), 12) == [scheme] * 12


def test_post_layers_is_the_count_that_alpha_rounds():
    """The reference's POST_NUM: "8 of 24" is 8, where alpha 0.33 gives ⌊7.92⌋ = 7."""
    assert layer_schemes(NormConfig(scheme="mix", alpha=0.33), 24).count("post") == 7
    assert layer_schemes(NormConfig(scheme="mix", post_layers=8), 24) == ["post"] * 8 + ["pre"] * 16
    assert layer_schemes(NormConfig(scheme="mix", post_layers=0), 4) == ["pre"] * 4
    assert post_ln_layers(NormConfig(scheme="mix", post_layers=24), 24) == 24


def test_hybrid_star_treats_the_first_block_differently():
    """HybridNorm* (Zhuo et al. 2025, the authors' ``norm_pos_special_config`` for block 0): a
    Pre-LN first block, HybridNorm blocks after it; q, k and v normalized per head in all of them."""
    schemes = layer_schemes(NormConfig(scheme="hybrid_star"), 4)
    assert schemes == ["hybrid_first", "hybrid", "hybrid", "hybrid"]
    assert {attention_norms(NormConfig(), s) for s in schemes} == {("per_head", "per_head")}


def test_attention_norms_come_from_the_scheme_unless_the_config_sets_them():
    assert attention_norms(NormConfig(), "pre") == ("none", "none")
    assert attention_norms(NormConfig(), "olmo2") == ("full", "none")  # OLMo 2's QK-norm
    assert attention_norms(NormConfig(), "hybrid") == ("per_head", "per_head")
    assert attention_norms(NormConfig(qk_norm="per_head"), "pre") == ("per_head", "none")  # Qwen3
    assert attention_norms(NormConfig(qk_norm="none", v_norm="full"), "olmo2") == ("none", "full")


def test_explicit_layers_override_the_scheme():
    layers = ["post", "pre", "lns", "peri", "deepnorm", "pre"]
    assert layer_schemes(NormConfig(scheme="mix", alpha=0.5, layers=layers), 6) == layers


def test_deepnorm_constants_follow_deepnet_and_can_reproduce_the_reference():
    a, b = deepnorm_constants(NormConfig(scheme="deepnorm"), 32)
    assert a == pytest.approx(64 ** 0.25) and b == pytest.approx(256 ** -0.25)
    a, b = deepnorm_constants(NormConfig(scheme="deepnorm", deepnorm_alpha=2.8284, deepnorm_beta=256 ** 0.25), 12)
    assert (a, b) == (2.8284, pytest.approx(4.0))


# ----------------------------------------------------------------------------------------------
# A new scheme is one row: a toy row added here (and nowhere else) builds, trains and exports.


def toy_row():
    from megamix.schemes import LayerScheme, SublayerNorms

    # Attention: a norm before it and after the add ("sandwich"); MLP: a norm on its output only.
    return LayerScheme("toy", "attention: N2(1.25·x + F(N1(x)·0.5)); mlp: x + N3(F(x))",
                       SublayerNorms(before=True, after=True), SublayerNorms(output=True),
                       input_scale=lambda layer, num_layers, norm: 0.5,
                       residual_weight=lambda layer, num_layers, norm: 1.25,
                       hf_names={("attention", "before"): "input_layernorm"})


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def test_a_toy_scheme_row_builds_the_block_its_formula_describes(monkeypatch):
    from megamix import schemes
    from megamix.config import load_config, validate
    from megamix.model import Transformer

    monkeypatch.setitem(schemes.SCHEMES, "toy", toy_row())
    cfg = validate(load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
                                      "model.intermediate_size=64", "model.vocab_size=64",
                                      "norm.layers=[toy,pre]"]))
    torch.manual_seed(0)
    block = Transformer(cfg.model, cfg.norm).double().layers["0"]
    for p in block.parameters():
        if p.ndim == 1:
            p.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    cos, sin = (t.double() for t in rope_tables(8, 5, 10000.0))
    eps = cfg.model.norm_eps
    attn = lambda h: block.attention(h, cos, sin)  # noqa: E731
    n1, n2, n3 = block.attention_norm.weight, block.attention_after_norm.weight, block.mlp_out_norm.weight
    h = rms(1.25 * x + attn(rms(x, n1, eps) * 0.5), n2, eps)
    expected = h + rms(block.mlp(h), n3, eps)
    torch.testing.assert_close(block.stream(*block(x, None, cos, sin)), expected, rtol=1e-12, atol=1e-12)


def test_a_toy_scheme_row_trains_and_exports_to_hugging_face(monkeypatch, tmp_path):
    from conftest import TINY, write_corpus

    from megamix import schemes
    from megamix.checkpoint import load_model
    from megamix.config import load_config
    from megamix.hf.export import export_checkpoint
    from megamix.train.trainer import Trainer

    transformers = pytest.importorskip("transformers")
    monkeypatch.setitem(schemes.SCHEMES, "toy", toy_row())
    write_corpus(tmp_path / "corpus")
    cfg = load_config(None, TINY + [f"data.path={tmp_path / 'corpus'}", f"train.output_dir={tmp_path / 'run'}",
                                    "norm.layers=[toy,pre,post,toy]", "train.steps=8", "train.lr=1e-2",
                                    "train.min_lr=1e-2", "train.eval_interval=0"])
    history = Trainer(cfg).run()
    assert history[-1]["loss"] < history[0]["loss"] - 0.05  # it learns
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["layer_schemes"] == ["toy", "pre", "post", "toy"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    ours = load_model(tmp_path / "run")
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=0, atol=1e-5)
