"""Exports checked against transformers: for every placement, a trained tiny checkpoint exported
to Hugging Face format must give ``megamix.load_model``'s logits (fp32, 1e-5) and the same greedy
generation through transformers' KV cache; Pre-LN must be stock ``LlamaForCausalLM``; the weight
names must be the reference's (docs/placements.md); the export must stream."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import PARALLEL_SCHEMES, run_overrides, write_corpus
from safetensors import safe_open

from megamix import load_model
from megamix.config import load_config
from megamix.hf.export import MODELING_FILE, export_checkpoint
from megamix.train.trainer import Trainer

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

SCHEMES = {
    "pre": [],
    "post": ["norm.scheme=post"],
    "mix": ["norm.scheme=mix", "norm.alpha=0.5"],
    "lns": ["norm.scheme=lns"],
    "peri": ["norm.scheme=peri"],
    "deepnorm": ["norm.scheme=deepnorm"],
    "mix_layernorm": ["norm.scheme=mix", "norm.alpha=0.25", "norm.type=layernorm"],
    "explicit_tied": ["norm.layers=[post,peri,lns,deepnorm]", "model.tie_embeddings=true"],
    # OLMo 2 (full QK-norm), HybridNorm (per-head QKV-norm), HybridNorm*'s first block, Peri-LN with
    # its embedding norm; DyT in every norm, q and k's over the whole projection, the embedding
    # times a learned scalar as the DyT authors' LLaMA.
    "new_placements": ["norm.layers=[hybrid_first,olmo2,hybrid,peri]", "norm.embedding_norm=true",
                       "norm.type=layernorm"],
    "dyt_hybrid_star": ["norm.type=dyt", "norm.scheme=hybrid_star", "norm.qk_norm=full", "model.embedding_scale=true"],
}
NEW_NORMS = ["new_placements", "dyt_hybrid_star"]


def train(root: Path, overrides: list[str]) -> Path:
    """A tiny checkpoint trained a few steps in one process.  A few steps barely move the norms off
    1, so the model is re-saved with random norm weights (and biases): a norm exported under the
    wrong name then changes the logits.  (The TP2·PP2 checkpoints of ``tp2_pp2_runs`` are saved as
    trained.)"""
    write_corpus(root / "corpus")
    trainer = Trainer(load_config(None, run_overrides(root, overrides)), device="cpu")
    trainer.run()
    with torch.no_grad():
        for p in trainer.engine.model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    trainer.save()
    return root / "run"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, request):
    """``checkpoint(scheme, layout)`` → a run directory, trained once per module."""
    runs = {}

    def get(scheme: str, layout: str = "1proc") -> Path:
        if layout == "tp2pp2":
            return request.getfixturevalue("tp2_pp2_runs")[scheme][0]
        if scheme not in runs:
            runs[scheme] = train(tmp_path_factory.mktemp(f"{scheme}_1proc"), SCHEMES[scheme])
        return runs[scheme]

    return get


def load_hf(path: Path, remote_code: bool):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=remote_code, local_files_only=True
    ).eval()


def greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by recomputing the whole prefix every step (no cache): the reference."""
    tokens = prompt
    for _ in range(steps):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def assert_same_model(ours, theirs, vocab: int = 512) -> None:
    tokens = torch.randint(0, vocab, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=0, atol=1e-5)
        prompt = tokens[:1, :6]
        out = theirs.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True,
                              return_dict_in_generate=True, pad_token_id=0)
        assert out.past_key_values.get_seq_length() == 6 + 20 - 1  # the KV cache did the decoding
        assert torch.equal(out.sequences, greedy(ours, prompt, 20))


@pytest.mark.parametrize("layout,scheme", [("1proc", s) for s in SCHEMES] + [("tp2pp2", s) for s in PARALLEL_SCHEMES])
def test_export_gives_megamix_logits_and_generation(checkpoint, tmp_path, scheme, layout):
    run = checkpoint(scheme, layout)
    out = export_checkpoint(run, tmp_path / f"export_{scheme}_{layout}", dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("llama" if scheme == "pre" else "megamix")
    assert_same_model(load_model(run), load_hf(out, remote_code=scheme != "pre"))


@pytest.mark.parametrize("scheme", NEW_NORMS)
def test_new_norms_round_trip_through_the_importer(checkpoint, tmp_path, scheme):
    """An export of the new placements and norm types imports back (``import_hf``, what
    ``convert_from_hf.py`` runs) into the same model: its per-layer norms and every weight."""
    from megamix.checkpoint.files import checkpoint_config, resolve_checkpoint
    from megamix.hf.importer import import_hf
    from megamix.schemes import attention_norms

    run = checkpoint(scheme)
    out = export_checkpoint(run, tmp_path / "export", dtype="fp32")
    import_hf(out, tmp_path / "imported")
    ours, back = load_model(run), load_model(tmp_path / "imported")
    cfg, cfg_back = (checkpoint_config(resolve_checkpoint(p)) for p in (run, tmp_path / "imported"))
    assert back.schemes == ours.schemes
    assert ([attention_norms(cfg_back.norm, s) for s in back.schemes]
            == [attention_norms(cfg.norm, s) for s in ours.schemes])
    assert (cfg_back.norm.type, cfg_back.norm.embedding_norm) == (cfg.norm.type, cfg.norm.embedding_norm)
    assert cfg_back.model.embedding_scale == cfg.model.embedding_scale
    mine, theirs = ours.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_only_plain_pre_ln_rmsnorm_is_stock_llama():
    """A norm on q, k, v or the embedding, an embedding scale, or DyT, makes a Pre-LN model a megamix export."""
    from megamix.config import ModelConfig, NormConfig
    from megamix.hf.adapter import hf_config, is_stock_llama

    assert is_stock_llama(ModelConfig(num_layers=4), NormConfig())
    for norm in (NormConfig(qk_norm="per_head"), NormConfig(v_norm="full"), NormConfig(embedding_norm=True),
                 NormConfig(type="dyt"), NormConfig(scheme="hybrid_first")):
        assert not is_stock_llama(ModelConfig(num_layers=4), norm)
    assert not is_stock_llama(ModelConfig(num_layers=4, embedding_scale=True), NormConfig())
    fields = hf_config(ModelConfig(num_layers=2), NormConfig(qk_norm="per_head", embedding_norm=True))
    assert fields["model_type"] == "megamix" and fields["embedding_norm"]
    assert [(row["qk_norm"], row["v_norm"]) for row in fields["layer_norms"]] == [("per_head", "none")] * 2


def test_pre_ln_export_is_stock_llama_without_remote_code(checkpoint, tmp_path):
    out = export_checkpoint(checkpoint("pre"), tmp_path / "stock", dtype="fp32")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    hf = load_hf(out, remote_code=False)
    assert type(hf) is transformers.LlamaForCausalLM
    assert_same_model(load_model(checkpoint("pre")), hf)


def test_other_placements_refuse_to_load_as_plain_llama(checkpoint, tmp_path):
    out = export_checkpoint(checkpoint("mix"), tmp_path / "mix_export", dtype="fp32")
    with pytest.raises(ValueError):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False, local_files_only=True)
    config = json.loads((out / "config.json").read_text())
    assert config["layer_schemes"] == ["post", "post", "pre", "pre"]
    assert (out / "modeling_megamix.py").read_text() == MODELING_FILE.read_text()


def test_weight_names_follow_the_spec(checkpoint, tmp_path):
    """docs/placements.md: a Pre-LN layer's norms are input_layernorm (before attention) and
    post_attention_layernorm (before the MLP); a Post-LN layer's are post_attention_layernorm (after
    the attention add) and post_feedforward_layernorm (after the MLP add), with no input_layernorm."""
    spec = {
        0: {"post_attention_layernorm": "attention_norm", "post_feedforward_layernorm": "mlp_norm"},  # post
        2: {"input_layernorm": "attention_norm", "post_attention_layernorm": "mlp_norm"},  # pre
    }
    ours = load_model(checkpoint("mix"))
    out = export_checkpoint(checkpoint("mix"), tmp_path / "names", dtype="fp32")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for layer, norms in spec.items():
        prefix = f"model.layers.{layer}."
        modules = {name[len(prefix):].split(".")[0] for name in tensors if name.startswith(prefix)}
        assert modules == {*norms, "self_attn", "mlp"}
        for theirs, mine in norms.items():
            assert torch.equal(tensors[f"{prefix}{theirs}.weight"], getattr(ours.layers[str(layer)], mine).weight)
    assert torch.equal(tensors["model.layers.3.self_attn.k_proj.weight"], ours.layers["3"].attention.k_proj.weight)
    assert torch.equal(tensors["model.norm.weight"], ours.norm.weight)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= tensors.keys()


def test_modeling_file_does_not_import_megamix():
    tree = ast.parse(MODELING_FILE.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m.split(".")[0] for m in modules} <= {"__future__", "math", "typing", "torch", "transformers"}


def test_sharded_bf16_export_loads_through_its_index(checkpoint, tmp_path):
    run = checkpoint("peri")
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_to_hf

    out = tmp_path / "sharded"
    assert convert_to_hf.main(["--checkpoint", str(run), "--output", str(out), "--dtype", "bf16",
                               "--max-shard-size", "0.00002", "--verify"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    tensors = {}
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    assert tensors.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    ours = load_model(run)
    assert torch.equal(tensors["model.layers.1.mlp.up_proj.weight"],
                       ours.layers["1"].mlp.up_proj.weight.to(torch.bfloat16))
    # The bf16 export computes in fp32 what megamix computes with bf16-rounded weights.
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(p.to(torch.bfloat16))
    tokens = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out, True)(tokens).logits, ours(tokens), rtol=0, atol=1e-5)


def test_export_reads_one_module_at_a_time(checkpoint, tmp_path, monkeypatch):
    """Peak memory ≈ one layer: every DCP read asks for at most one block's (or the embedding's)
    tensors, never the model."""
    from megamix.checkpoint import dcp as dcp_module

    requested = []
    real_load = dcp_module.dcp.load

    def spy(state_dict, **kwargs):
        requested.append(sum(t.numel() * t.element_size() for t in state_dict["model"].values()))
        return real_load(state_dict, **kwargs)

    run = checkpoint("mix")
    model = load_model(run)
    monkeypatch.setattr(dcp_module.dcp, "load", spy)
    export_checkpoint(run, tmp_path / "streamed", dtype="fp32")
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    largest_module = max(sum(p.numel() * 4 for p in m.parameters())
                         for m in (model.embed_tokens, model.lm_head, *model.layers.values()))
    assert sum(requested) == total
    assert len(requested) == 4 + 3 and max(requested) <= largest_module < total / 3


def test_export_refuses_to_overwrite_and_never_leaves_half_an_export(checkpoint, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        export_checkpoint(checkpoint("pre"), out)
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="tokens but the model only"):  # the 32k tokenizer, a 512-token model
        export_checkpoint(checkpoint("pre"), tmp_path / "bad", tokenizer=mistral_tokenizer())
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.tmp").exists()


def mistral_tokenizer() -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    from make_demo_corpus import mistral_tokenizer_path

    return mistral_tokenizer_path()
