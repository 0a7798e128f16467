"""Checkpoints and configs written by megamix 0.1 (before the engine/checkpoint redesign) keep
working: ``tests/fixtures/v0_1_run`` is a tiny Mix-LN run saved by that code (config with the
since-renamed ``train.eval_steps``), loaded, exported and resumed by today's."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import megamix
from megamix.config import load_config
from megamix.train.trainer import Trainer

FIXTURE = Path(__file__).parent / "fixtures" / "v0_1_run"
CHECKPOINT = FIXTURE / "checkpoints" / "step_0000003"


def test_an_old_config_loads_with_a_deprecation_notice(capsys):
    cfg = load_config(FIXTURE / "config.yaml")
    assert cfg.train.eval_tokens == 2 * 2 * 8  # eval_steps × micro_batch_size × seq_len
    assert "train.eval_steps is deprecated" in capsys.readouterr().err


def test_an_old_checkpoint_loads_with_the_weights_it_holds():
    model = megamix.load_model(CHECKPOINT)
    assert model.schemes == ["post", "pre"]
    # torch's own DCP reader (the fixture is ours, so its default planner is fine here) as the reference
    expected = {name: torch.empty_like(t) for name, t in model.state_dict().items()}
    dcp.load({"model": expected}, checkpoint_id=CHECKPOINT)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_an_old_checkpoint_exports_to_hugging_face_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megamix.hf.export import export_checkpoint

    out = export_checkpoint(CHECKPOINT, tmp_path / "hf", dtype="fp32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, megamix.load_model(CHECKPOINT)(tokens), rtol=0, atol=1e-5)


def test_an_old_run_resumes_and_trains_on(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "checkpoints", run / "checkpoints")
    overrides = [f"train.output_dir={run}", f"data.path={FIXTURE / 'corpus'}", "train.steps=5",
                 "train.accept_changes=[data.path]"]  # the fixture was written with another corpus path
    trainer = Trainer(load_config(FIXTURE / "config.yaml", overrides))
    assert (trainer.step, trainer.consumed_samples) == (3, 12)
    history = trainer.run()
    assert [r["step"] for r in history] == [4, 5] and all(r["loss"] == r["loss"] for r in history)
    assert json.loads((run / "checkpoints" / "step_0000005" / "train_state.json").read_text())["consumed_samples"] == 20
