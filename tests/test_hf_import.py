"""Imports checked against transformers: a Hugging Face Llama goes into megamix and back out
bit for bit, computes transformers' logits in between, and can be fine-tuned by the trainer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, write_corpus
from safetensors.torch import load_file

from megamix import load_model
from megamix.checkpoint import latest_checkpoint
from megamix.config import load_config
from megamix.hf.export import export_checkpoint
from megamix.hf.importer import import_hf
from megamix.hf.tokenizer import save_tokenizer
from megamix.train.trainer import Trainer

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import convert_from_hf  # noqa: E402
import convert_to_hf  # noqa: E402

ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id")


def llama(directory: Path, dtype: torch.dtype, tie: bool = False, **config) -> Path:
    """A random transformers Llama (GQA, non-default RoPE base and eps, non-trivial norm weights)
    saved with a tokenizer, as a downloaded model would be."""
    torch.manual_seed(0)
    fields = dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **config}))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(directory)
    tokenizer_source = directory.parent / "tokenizer_source"
    tokenizer_source.mkdir(exist_ok=True)
    (tokenizer_source / "tokenizer.json").write_text(json.dumps(_word_level_tokenizer()))
    save_tokenizer(tokenizer_source / "tokenizer.json", directory, 64)
    return directory


def _word_level_tokenizer() -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 500)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return json.loads(tok.to_str())


@pytest.mark.parametrize("dtype,flag", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_hf_to_megamix_to_hf_round_trip_is_bit_exact(tmp_path, dtype, flag):
    source = llama(tmp_path / "hf", dtype)
    assert convert_from_hf.main(["--hf", str(source), "--output", str(tmp_path / "run")]) == 0
    assert convert_to_hf.main(["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "back"),
                               "--dtype", flag, "--tokenizer", str(tmp_path / "run" / "tokenizer")]) == 0
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert after[name].dtype == dtype
        assert torch.equal(before[name].view(torch.uint8), after[name].view(torch.uint8)), name
    config_before = json.loads((source / "config.json").read_text())
    config_after = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: config_before[k] for k in ARCHITECTURE} == {k: config_after[k] for k in ARCHITECTURE}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back", local_files_only=True)
    assert tokenizer("w5 w7 w400")["input_ids"] == [5, 7, 400]


def test_imported_model_computes_transformers_logits(tmp_path):
    source = llama(tmp_path / "hf", torch.float32, tie=True)
    import_hf(source, tmp_path / "run")
    ours = load_model(tmp_path / "run")
    reference = transformers.LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), reference(tokens).logits, rtol=0, atol=1e-5)
    assert ours.lm_head.weight is ours.embed_tokens.weight


def test_megamix_export_imports_back_with_its_placements(tmp_path):
    write_corpus(tmp_path / "corpus")
    overrides = ["norm.scheme=mix", "norm.alpha=0.5", "norm.type=layernorm", "train.steps=3", "train.eval_interval=0",
                 f"data.path={tmp_path / 'corpus'}", f"train.output_dir={tmp_path / 'trained'}"]
    Trainer(load_config(None, TINY + overrides), device="cpu").run()
    export_checkpoint(tmp_path / "trained", tmp_path / "hf", dtype="fp32")
    import_hf(tmp_path / "hf", tmp_path / "reimported")
    original, reimported = load_model(tmp_path / "trained"), load_model(tmp_path / "reimported")
    assert reimported.schemes == ["post", "post", "pre", "pre"] and reimported.norm.kind == "layer"
    tokens = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(tokens), reimported(tokens))


def test_imported_checkpoint_fine_tunes_from_its_weights(tmp_path):
    source = llama(tmp_path / "hf", torch.bfloat16)
    import_hf(source, tmp_path / "run", ["train.weight_decay=0.1"])
    write_corpus(tmp_path / "corpus")
    cfg = load_config(tmp_path / "run" / "config.yaml", [f"data.path={tmp_path / 'corpus'}", "train.steps=2",
                                                          "train.eval_interval=0", "train.tensorboard=false",
                                                          "train.progress_bar=false", "train.global_batch_size=4",
                                                          "train.micro_batch_size=4", "data.seq_len=32",
                                                          "data.split=90,10"])
    trainer = Trainer(cfg, device="cpu")
    assert trainer.step == 0 and trainer.resumed_from == latest_checkpoint(tmp_path / "run")
    expected = load_file(source / "model.safetensors")["model.layers.1.mlp.up_proj.weight"].float()
    assert torch.equal(trainer.engine.model.layers["1"].mlp.up_proj.weight.detach(), expected)
    assert trainer.engine.optimizer.param_groups[0]["weight_decay"] == 0.1
    trainer.run()
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}}, "RoPE"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_import_refuses_llama_variants_megamix_cannot_represent(tmp_path, change, message):
    source = llama(tmp_path / "hf", torch.float32, **change)
    with pytest.raises(ValueError, match=message):
        import_hf(source, tmp_path / "run")
    assert not (tmp_path / "run").exists()
