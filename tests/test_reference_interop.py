"""The papers' reference code as a peer, both ways, checked against an independent construction.

The reference (pixeli99/MixLN, its successor MixLN-Next, lmsdss/LayerNorm-Scaling) is transformers'
Llama with a modified ``LlamaDecoderLayer``: its placement comes from the environment variables
``NORM_TYPE`` and ``POST_NUM``, not from ``config.json``, and transformers 4.31's
``save_pretrained(..., safe_serialization=False)`` writes its weights as a pickled state dict,
``pytorch_model.bin`` (sharded above the size limit, with an index), in bf16, the rotary
``inv_freq`` buffers included.  Here that model is rebuilt from stock transformers
``LlamaForCausalLM`` by patching its decoder layers the way the reference's layer computes them
(written below from the reference's definition, not from megamix), and saved in that format by
hand, since transformers 5 writes safetensors only.  Imports must give its logits (1e-5), megamix
exports must load back into it with megamix's logits, and a planted pickle must never run.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY

from megamix import load_model
from megamix.checkpoint.dcp import save_checkpoint
from megamix.config import NormConfig, load_config
from megamix.hf.export import export_checkpoint
from megamix.hf.importer import HFImportError, ReferencePlacement, UnsafeWeightsError, import_hf
from megamix.hf.reference import DEEPPOST_ALPHA, ReferenceNormTypeError, reference_record
from megamix.model import Transformer
from megamix.train.optim import build_optimizer

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import convert_from_hf  # noqa: E402

VOCAB, LAYERS = 512, 4


def config_431(**changes) -> dict:
    """A ``config.json`` as transformers 4.31 saved the reference's Llama: ``model_type`` llama,
    nothing about the placement, ``pad_token_id`` -1, the reference's ``max_sequence_length``."""
    fields = {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
        "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48, "max_position_embeddings": 2048,
        "max_sequence_length": 1024, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": LAYERS,
        "num_key_value_heads": 4, "pad_token_id": -1, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0", "use_cache": True, "vocab_size": VOCAB,
    }
    return {**fields, **changes}


# ----------------------------------------------------------------------------------------------
# The reference's decoder layer, on stock transformers Llama.


def layer_kind(norm_type: str, index: int, post_num: int) -> str:
    """What the reference's ``LlamaDecoderLayer`` builds for layer ``index``: ``post_pre`` makes
    the layers with ``layer_index < POST_NUM`` Post-LN and the rest Pre-LN; ``pre``, ``post``,
    ``deeppost`` and ``sandwich`` are the same kind at every depth."""
    if norm_type == "post_pre":
        return "post" if index < post_num else "pre"
    return norm_type


def post_ln_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                    position_embeddings=None, **kwargs):
    """The reference's Post-LN branch (``post`` and, with ``residual_weight`` (2·32)^¼, ``deeppost``):
    residual = x; x = attn(x); x = post_attention_layernorm(a·residual + x); then the same with the
    MLP and ``post_feedforward_layernorm``.  No ``input_layernorm``."""
    residual = hidden_states
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    hidden_states = self.post_attention_layernorm(self.residual_weight * residual + hidden_states)
    residual = hidden_states
    hidden_states = self.mlp(hidden_states)
    return self.post_feedforward_layernorm(self.residual_weight * residual + hidden_states)


def sandwich_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                     position_embeddings=None, **kwargs):
    """The reference's ``sandwich`` branch: x + post_attention_layernorm(attn(input_layernorm(x))), then
    x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))."""
    residual = hidden_states
    hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                      attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                      use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    hidden_states = residual + self.post_attention_layernorm(hidden_states)
    residual = hidden_states
    hidden_states = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden_states)))
    return residual + hidden_states


def reference_model(fields: dict, norm_type: str, post_num: int = 1) -> transformers.LlamaForCausalLM:
    """Stock ``LlamaForCausalLM`` with its decoder layers patched as the reference's ``NORM_TYPE`` /
    ``POST_NUM`` build and run them (a Pre-LN layer is transformers' own), in fp32."""
    config = transformers.LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    model = transformers.LlamaForCausalLM(config)
    size, eps = config.hidden_size, config.rms_norm_eps
    for index, layer in enumerate(model.model.layers):
        kind = layer_kind(norm_type, index, post_num)
        if kind in ("post", "deeppost"):
            del layer.input_layernorm
            layer.post_feedforward_layernorm = LlamaRMSNorm(size, eps=eps)
            layer.residual_weight = DEEPPOST_ALPHA if kind == "deeppost" else 1.0
            layer.forward = types.MethodType(post_ln_forward, layer)
        elif kind == "sandwich":
            layer.pre_feedforward_layernorm = LlamaRMSNorm(size, eps=eps)
            layer.post_feedforward_layernorm = LlamaRMSNorm(size, eps=eps)
            layer.forward = types.MethodType(sandwich_forward, layer)
        else:
            assert kind == "pre", kind
    return model.float().eval()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights with norm weights off 1, so a norm loaded into the wrong slot shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def save_reference_checkpoint(model, directory: Path, fields: dict, shards: int = 1, fmt: str = "bin",
                              alpha_t: bool = False) -> Path:
    """What the reference's final ``save_pretrained`` wrote under transformers 4.31: ``config.json``
    and the bf16 state dict, the persistent rotary ``inv_freq`` buffer of every layer included, as
    ``pytorch_model.bin`` (or ``pytorch_model-0000k-of-0000n.bin`` shards and
    ``pytorch_model.bin.index.json``); ``fmt="safetensors"`` for the newer transformers' format.
    ``alpha_t``: also the non-trainable ``alpha_t`` vector MixLN-Next's Pre-LN layers carry (its
    ``cod`` type's scales, 1/sqrt(l) with ``layer_scale=true``), which their forward never reads."""
    directory.mkdir(parents=True)
    state = {name: t.detach().to(torch.bfloat16).clone() for name, t in model.state_dict().items()}
    head_dim = fields["hidden_size"] // fields["num_attention_heads"]
    for index in range(fields["num_hidden_layers"]):
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        state[f"model.layers.{index}.self_attn.rotary_emb.inv_freq"] = inv_freq.to(torch.bfloat16)
        if alpha_t:
            layers = fields["num_hidden_layers"]
            state[f"model.layers.{index}.alpha_t"] = (1 / torch.arange(1, layers + 1).sqrt()).to(torch.bfloat16)
    (directory / "config.json").write_text(json.dumps(fields, indent=2))
    stem, suffix = ("pytorch_model", ".bin") if fmt == "bin" else ("model", ".safetensors")
    names = list(state)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for k, part in enumerate(parts):
        file = f"{stem}{suffix}" if shards == 1 else f"{stem}-{k + 1:05d}-of-{shards:05d}{suffix}"
        piece = {name: state[name] for name in part}
        if fmt == "bin":
            torch.save(piece, directory / file)
        else:
            from safetensors.torch import save_file

            save_file({n: t.contiguous() for n, t in piece.items()}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        (directory / f"{stem}{suffix}.index.json").write_text(json.dumps(index, indent=2))
    return directory


def tokens(length: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, length), generator=torch.Generator().manual_seed(1))


def bf16_rounded(model):
    """The model with its weights rounded to bf16 and back: what the bf16 checkpoint holds (the
    rotary tables stay fp32, as they are recomputed on load)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


# ----------------------------------------------------------------------------------------------
# Reference checkpoint → megamix.

CHECKPOINTS = {  # name: (NORM_TYPE, POST_NUM, shards, format, the megamix layers it must give)
    "pre_mixln_next_bin": ("pre", None, 1, "bin", ["pre"] * 4),  # with MixLN-Next's unused alpha_t
    "post_pre_bin": ("post_pre", 2, 1, "bin", ["post", "post", "pre", "pre"]),
    "post_pre_sharded_bin": ("post_pre", 1, 3, "bin", ["post", "pre", "pre", "pre"]),
    "post_pre_safetensors": ("post_pre", 3, 2, "safetensors", ["post", "post", "post", "pre"]),
    "deeppost_bin": ("deeppost", None, 2, "bin", ["deepnorm"] * 4),
    "sandwich_bin": ("sandwich", None, 1, "bin", ["peri"] * 4),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_reference_checkpoint_imports_with_its_logits(tmp_path, name):
    norm_type, post_num, shards, fmt, layers = CHECKPOINTS[name]
    fields = config_431()
    reference = reference_model(fields, norm_type, post_num or 1)
    randomize(reference)
    source = save_reference_checkpoint(reference, tmp_path / "ref", fields, shards, fmt,
                                       alpha_t=name.endswith("mixln_next_bin"))
    args = ["--hf", str(source), "--output", str(tmp_path / "run"), "--reference-norm-type", norm_type]
    if post_num is not None:
        args += ["--reference-post-num", str(post_num)]
    assert convert_from_hf.main(args) == 0  # --verify is on by default
    ours = load_model(tmp_path / "run")
    assert ours.schemes == layers
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()), bf16_rounded(reference)(tokens()).logits, rtol=0, atol=1e-5)
    if norm_type == "deeppost":
        assert ours.layers["0"].residual_weight == DEEPPOST_ALPHA


def test_reference_values_are_case_insensitive_and_imports_without_verify(tmp_path):
    fields = config_431()
    reference = reference_model(fields, "post_pre", 1)
    randomize(reference)
    source = save_reference_checkpoint(reference, tmp_path / "ref", fields)
    import_hf(source, tmp_path / "run", reference=ReferencePlacement("POST_PRE", 1), verify=False)
    assert load_model(tmp_path / "run").schemes == ["post", "pre", "pre", "pre"]


def test_megamix_flags_give_the_placement_too(tmp_path):
    fields = config_431()
    reference = reference_model(fields, "post_pre", 2)
    randomize(reference)
    source = save_reference_checkpoint(reference, tmp_path / "ref", fields)
    assert convert_from_hf.main(["--hf", str(source), "--output", str(tmp_path / "run"),
                                 "--set", "norm.layers=[post,post,pre,pre]"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "run")(tokens()),
                                   bf16_rounded(reference)(tokens()).logits, rtol=0, atol=1e-5)


def test_the_weights_names_check_the_placement_and_verification_the_conversion(tmp_path, capsys, monkeypatch):
    fields = config_431()
    reference = reference_model(fields, "post_pre", 2)
    randomize(reference)
    source = save_reference_checkpoint(reference, tmp_path / "ref", fields)
    # Without a placement the Post-LN weights have no place in a Llama: named, with the hint.
    assert convert_from_hf.main(["--hf", str(source), "--output", str(tmp_path / "run")]) == 1
    assert "--reference-norm-type" in capsys.readouterr().err
    # A wrong POST_NUM puts a Post-LN layer's norms where a Pre-LN layer has none.
    assert convert_from_hf.main(["--hf", str(source), "--output", str(tmp_path / "run"),
                                 "--reference-norm-type", "post_pre", "--reference-post-num", "1"]) == 1
    assert "model.layers.1.post_feedforward_layernorm.weight has no place" in capsys.readouterr().err
    # A conversion that puts a weight in the wrong place fails verification, and nothing is written.
    import megamix.hf.importer as importer

    def swapped(name, schemes, real=importer.from_hf_name):
        ours = real(name, schemes)
        swap = {"layers.0.attention_norm.weight": "layers.0.mlp_norm.weight",
                "layers.0.mlp_norm.weight": "layers.0.attention_norm.weight"}
        return swap.get(ours, ours)

    monkeypatch.setattr(importer, "from_hf_name", swapped)
    assert convert_from_hf.main(["--hf", str(source), "--output", str(tmp_path / "run"),
                                 "--reference-norm-type", "post_pre", "--reference-post-num", "2"]) == 1
    assert "logits differ" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("norm_type,message", [
    ("mono", "router"), ("pre_post_pre_post", "no forward branch"), ("cod", "alpha_t"),
    ("layernorm_everywhere", "not a placement of the reference code"),
])
def test_reference_values_megamix_cannot_represent_are_refused_by_name(tmp_path, norm_type, message):
    source = save_reference_checkpoint(reference_model(config_431(), "pre"), tmp_path / "ref", config_431())
    with pytest.raises(ReferenceNormTypeError, match=message):
        import_hf(source, tmp_path / "run", reference=ReferencePlacement(norm_type))
    with pytest.raises(ReferenceNormTypeError, match="POST_NUM"):
        import_hf(source, tmp_path / "run", reference=ReferencePlacement("post_pre"))
    assert not (tmp_path / "run").exists()


def test_a_planted_pickle_in_pytorch_model_bin_never_runs(tmp_path):
    """Unpickling the payload would run ``touch MARKER``; it is refused, named, and never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    fields = config_431()
    source = save_reference_checkpoint(reference_model(fields, "pre"), tmp_path / "ref", fields)
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = Payload()
    torch.save(state, source / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="pytorch_model.bin.*refused to unpickle"):
        import_hf(source, tmp_path / "run", reference=ReferencePlacement("pre"))
    assert not marker.exists() and not (tmp_path / "run").exists()
    assert convert_from_hf.main(["--hf", str(source), "--output", str(tmp_path / "run2")]) == 1
    assert not marker.exists()


def test_a_shard_index_may_only_name_files_beside_it(tmp_path):
    fields = config_431()
    source = save_reference_checkpoint(reference_model(fields, "pre"), tmp_path / "ref", fields, shards=2)
    index = json.loads((source / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.bin"
    (source / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(HFImportError, match="not a file name"):
        import_hf(source, tmp_path / "run")


# ----------------------------------------------------------------------------------------------
# megamix export → the reference construction.


def megamix_checkpoint(root: Path, overrides: list[str]) -> Path:
    """A megamix run directory holding a checkpoint of the config's model with random weights."""
    cfg = load_config(None, TINY + ["model.num_kv_heads=4", f"train.output_dir={root / 'run'}", *overrides])
    model = Transformer(cfg.model, cfg.norm)
    randomize(model, seed=3)
    path = save_checkpoint(root / "run", 1, model, build_optimizer(model, cfg.train),
                           {"step": 1, "consumed_samples": 8})
    cfg.save(path / "config.yaml")
    return root / "run"


EXPORTS = {  # name: (megamix overrides, the reference values its config.json must give)
    "mix": (["norm.scheme=mix", "norm.alpha=0.5"], ("post_pre", 2)),
    "deepnorm_reference_constant": (["norm.scheme=deepnorm", f"norm.deepnorm_alpha={DEEPPOST_ALPHA}"],
                                    ("deeppost", None)),
    "peri": (["norm.scheme=peri"], ("sandwich", None)),
    "pre": ([], ("pre", None)),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_megamix_export_loads_into_the_reference_construction(tmp_path, name):
    overrides, (norm_type, post_num) = EXPORTS[name]
    run = megamix_checkpoint(tmp_path, overrides)
    out = export_checkpoint(run, tmp_path / "hf", dtype="fp32")
    fields = json.loads((out / "config.json").read_text())
    assert fields["reference"]["NORM_TYPE"] == norm_type and fields["reference"]["POST_NUM"] == post_num
    # The reference's loading: its model class built under NORM_TYPE/POST_NUM from config.json, then
    # the weights by name, every one of them used.
    reference = reference_model({k: fields[k] for k in config_431() if k in fields}, norm_type, post_num or 1)
    from safetensors.torch import load_file

    missing, unexpected = reference.load_state_dict(load_file(out / "model.safetensors"), strict=False)
    assert not unexpected and not missing
    with torch.no_grad():
        torch.testing.assert_close(reference(tokens()).logits, load_model(run)(tokens()), rtol=0, atol=1e-5)


def test_exports_the_reference_cannot_compute_say_why():
    def record(**norm):
        from megamix.config import ModelConfig

        model = norm.pop("model", ModelConfig(num_layers=4, num_heads=4, hidden_size=32))
        return reference_record(model, NormConfig(**norm))

    from megamix.config import ModelConfig

    assert record(scheme="mix", alpha=0.25).norm_type == "post_pre" and record(scheme="mix", alpha=0.25).post_num == 1
    assert record(type="layernorm").reason.startswith("norm.type=layernorm")
    gqa = ModelConfig(num_layers=4, num_heads=4, num_kv_heads=2, hidden_size=32)
    assert "grouped-query" in record(model=gqa).reason
    assert "no NORM_TYPE" in record(layers=["pre", "post", "pre", "pre"]).reason
    assert "residual weight" in record(scheme="deepnorm", deepnorm_alpha=1.5).reason
    default = record(scheme="deepnorm")  # DeepNet's (2L)^(1/4): MixLN-Next's later deeppost
    assert default.norm_type == "deeppost" and default.code == ("pixeli99/MixLN-Next",)
    assert record(scheme="lns").code == ("lmsdss/LayerNorm-Scaling",) and "LNS" in record(scheme="lns").note
    fields = record(layers=["post", "pre", "post", "pre"]).fields()
    assert fields["reference"] is None and "no NORM_TYPE" in fields["reference_note"]
