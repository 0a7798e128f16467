"""The single-process trainer: it learns, resumes exactly, checkpoints atomically, logs what
ARCHITECTURE.md promises, and its numbers agree with independent computations."""

import json
import math
import shutil

import pytest
import torch

from megamix.checkpoint import CheckpointError, latest_checkpoint
from megamix.checkpoint.dcp import load_checkpoint
from megamix.config import validate
from megamix.model import lm_loss
from megamix.train.optim import lr_at
from megamix.train.trainer import Trainer


def losses(history):
    return {r["step"]: r["loss"] for r in history}


def test_tiny_model_overfits_one_batch(tiny_config):
    cfg = tiny_config("train.steps=60", "train.lr=1e-2", "train.min_lr=1e-2", "train.warmup_steps=0",
                      "norm.scheme=mix", "norm.alpha=0.25")
    trainer = Trainer(cfg)
    tokens = torch.stack([trainer.data.train[i] for i in range(8)])
    first = None
    for _ in range(60):
        loss = lm_loss(trainer.engine.model(tokens[:, :-1]), tokens[:, 1:])
        first = first if first is not None else loss.item()
        loss.backward()
        trainer.engine.optimizer.step()
        trainer.engine.optimizer.zero_grad()
    assert first > 5.0 and loss.item() < 0.05


@pytest.mark.parametrize("scheme", ["mix", "post"])
def test_resume_reproduces_the_uninterrupted_loss_curve_exactly(tiny_config, tmp_path, scheme):
    extra = ["norm.scheme=" + scheme, "norm.alpha=0.5", "train.save_interval=10"]
    full = Trainer(tiny_config(*extra, f"train.output_dir={tmp_path / 'full'}")).run()

    interrupted = Trainer(tiny_config(*extra, f"train.output_dir={tmp_path / 'resumed'}"))
    step_once = interrupted.train_step

    def crash_after_13():
        record = step_once()
        if interrupted.step == 13:  # the last checkpoint is step 10
            interrupted.metrics.log(record)
            raise KeyboardInterrupt
        return record

    interrupted.train_step = crash_after_13
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    interrupted.metrics.close()
    resumed = Trainer(tiny_config(*extra, f"train.output_dir={tmp_path / 'resumed'}"))
    assert resumed.step == 10
    rest = resumed.run()
    assert [r["step"] for r in rest] == list(range(11, 21))
    for step, loss in losses(rest).items():
        assert loss == losses(full)[step]  # bit-exact on CPU

    # metrics.jsonl holds one line per step: the crashed run's steps 11-13 were replaced.
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if "loss" in r]
    assert train_steps == list(range(1, 11)) + list(range(11, 21))


def test_a_checkpoint_copied_into_a_fresh_output_dir_resumes_the_same(tiny_config, tmp_path):
    full = Trainer(tiny_config("train.save_interval=10", f"train.output_dir={tmp_path / 'a'}")).run()
    fresh = tmp_path / "b" / "checkpoints"
    fresh.mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_0000010", fresh / "step_0000010")
    rest = Trainer(tiny_config("train.save_interval=10", f"train.output_dir={tmp_path / 'b'}")).run()
    assert losses(rest) == {s: v for s, v in losses(full).items() if s > 10}


def test_half_written_checkpoints_are_never_picked_up(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=4", "train.save_interval=2")).run()
    root = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"
    shutil.copytree(root / "step_0000004", root / ".tmp_step_0000006")  # a save cut short
    shutil.copytree(root / "step_0000004", root / "step_0000008")
    (root / "step_0000008" / "train_state.json").unlink()  # incomplete, though named
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"


def test_corrupt_checkpoint_metadata_is_an_error_naming_the_file(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.steps=2"))
    trainer.run()
    ckpt = latest_checkpoint(tmp_path / "run")
    import pickle
    (ckpt / ".metadata").write_bytes(pickle.dumps(print))  # would call a function if unpickled blindly
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        load_checkpoint(ckpt, trainer.engine.model)
    (ckpt / ".metadata").write_bytes(b"\x80\x04trunc")
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        load_checkpoint(ckpt, trainer.engine.model)


def test_truncated_checkpoint_shard_is_an_error_naming_the_checkpoint(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.steps=2"))
    trainer.run()
    ckpt = latest_checkpoint(tmp_path / "run")
    (shard,) = ckpt.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="step_0000002"):
        load_checkpoint(ckpt, trainer.engine.model, trainer.engine.optimizer)


def test_metrics_hold_the_promised_fields_and_per_layer_grad_norms(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=3", "train.tensorboard=true")
    trainer = Trainer(cfg)
    trainer.run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "val_loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(train[0])
    assert [f"grad_norm/layer_{i:02d}" for i in range(4)] == [k for k in train[0] if k.startswith("grad_norm/")]
    assert evals and evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert validate(cfg) == validate(__import__("megamix.config").config.load_config(tmp_path / "run" / "config.yaml"))


def test_per_layer_grad_norm_is_the_root_of_summed_squares(tiny_config):
    trainer = Trainer(tiny_config("train.steps=1", "train.warmup_steps=0"))
    captured = {}

    def spy(engine):
        for i, block in engine.model.layers.items():
            captured[int(i)] = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in block.parameters()))

    trainer.engine.before_optimizer_step.append(spy)
    record = trainer.train_step()
    for i, value in captured.items():  # each parameter's norm accumulates in fp32, as clip_grad_norm_'s does
        assert record[f"grad_norm/layer_{i:02d}"] == pytest.approx(value, rel=1e-6)


def test_gradient_accumulation_equals_one_big_batch(tiny_config, tmp_path):
    a = Trainer(tiny_config("train.micro_batch_size=2", "train.global_batch_size=8", f"train.output_dir={tmp_path}/a"))
    b = Trainer(tiny_config("train.micro_batch_size=8", "train.global_batch_size=8", f"train.output_dir={tmp_path}/b"))
    ra, rb = a.train_step(), b.train_step()
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    for pa, pb in zip(a.engine.model.parameters(), b.engine.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_lr_schedule_is_linear_warmup_then_cosine_to_min_lr(tiny_config):
    t = tiny_config("train.steps=110", "train.warmup_steps=10", "train.lr=1e-3", "train.min_lr=1e-4").train
    assert lr_at(0, t) == pytest.approx(1e-4) and lr_at(9, t) == pytest.approx(1e-3)
    assert lr_at(60, t) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, t) == pytest.approx(1e-4)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_schedule_is_warmup_then_constant_then_a_decay_over_the_last_steps(tiny_config, shape):
    t = tiny_config("train.lr_schedule=wsd", "train.steps=100", "train.warmup_steps=10", "train.decay_steps=30",
                    f"train.decay_shape={shape}", "train.lr=1e-3", "train.min_lr=1e-4").train
    assert lr_at(0, t) == pytest.approx(1e-4) and lr_at(9, t) == pytest.approx(1e-3)
    assert all(lr_at(s, t) == 1e-3 for s in range(10, 71))  # stable until the decay's first step (70)
    for step in (71, 85, 99):
        progress = (step - 70) / 30
        fraction = 1 - progress if shape == "linear" else 1 - math.sqrt(progress)
        assert lr_at(step, t) == pytest.approx(1e-4 + 9e-4 * fraction)
    default = tiny_config("train.lr_schedule=wsd", "train.steps=100").train  # decay: the last 20 steps
    assert lr_at(79, default) == default.lr and lr_at(81, default) < default.lr


def test_extending_a_wsd_run_before_its_decay_trains_what_the_longer_plan_would(tiny_config, tmp_path):
    """Stopped at step 6 of a 10-step plan (decay: the last 2 steps), resumed as a 14-step run: every
    loss equals that of a run planned for 14 steps from the start (bit for bit: CPU, fp32)."""
    wsd = ["train.lr_schedule=wsd", "train.decay_steps=2", "train.eval_interval=0", "train.save_interval=6"]
    short = Trainer(tiny_config(*wsd, "train.steps=10", f"train.output_dir={tmp_path / 'extended'}"))
    for _ in range(6):
        short.train_step()
    short.save()
    short.wait_for_save()
    extended = Trainer(tiny_config(*wsd, "train.steps=14", f"train.output_dir={tmp_path / 'extended'}"))
    assert extended.step == 6
    got = [extended.train_step()["loss"] for _ in range(8)]
    planned = Trainer(tiny_config(*wsd, "train.steps=14", f"train.output_dir={tmp_path / 'planned'}"))
    want = [planned.train_step()["loss"] for _ in range(14)][6:]
    assert got == want


def test_z_loss_joins_the_objective_and_is_logged_beside_the_cross_entropy(tiny_config, tmp_path):
    """The gradients of one accumulated step equal those of CE + z · mean(logsumexp²) written out
    here; "loss" stays the cross-entropy, "z_loss" is the added term."""
    import copy

    import torch.nn.functional as F

    z = 0.05
    trainer = Trainer(tiny_config(f"train.z_loss={z}", "train.micro_batch_size=2"))  # 4 micro-batches
    reference = copy.deepcopy(trainer.engine.model)
    micro_batches = trainer.next_batch()
    ce = trainer.engine.forward_backward(micro_batches)
    want_ce = want_z = 0.0
    for tokens in micro_batches:
        logits = reference(tokens[:, :-1])
        cross_entropy = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        z_term = z * torch.logsumexp(logits, dim=-1).pow(2).mean()
        ((cross_entropy + z_term) / len(micro_batches)).backward()
        want_ce += cross_entropy.item() / len(micro_batches)
        want_z += z_term.item() / len(micro_batches)
    assert float(ce) == pytest.approx(want_ce, rel=1e-6)
    assert float(trainer.engine.last_z_loss) == pytest.approx(want_z, rel=1e-6)
    for (name, got), want in zip(trainer.engine.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7, msg=name)

    # In the loop: the first step's cross-entropy is the plain run's (same weights), and z-loss is logged.
    plain = Trainer(tiny_config(f"train.output_dir={tmp_path / 'plain'}")).train_step()
    with_z = Trainer(tiny_config(f"train.z_loss={z}", f"train.output_dir={tmp_path / 'z'}")).train_step()
    assert with_z["loss"] == plain["loss"] and "z_loss" not in plain
    assert with_z["z_loss"] > 0 and with_z["grad_norm"] != plain["grad_norm"]


def test_grad_clip_limits_the_update_norm(tiny_config):
    trainer = Trainer(tiny_config("train.grad_clip=0.01"))
    before = [p.detach().clone() for p in trainer.engine.model.parameters()]
    record = trainer.train_step()
    assert record["grad_norm"] > 0.01  # the logged norm is the one before clipping
    assert all(torch.isfinite(p).all() for p in trainer.engine.model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.engine.model.parameters()))


def test_load_model_gives_the_trained_models_logits(tiny_config, tmp_path):
    import megamix
    trainer = Trainer(tiny_config("train.steps=3", "norm.scheme=mix", "norm.alpha=0.5", "model.tie_embeddings=true"))
    trainer.run()
    loaded = megamix.load_model(tmp_path / "run")
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), trainer.engine.model.eval()(tokens), rtol=0, atol=0)
    assert loaded.schemes == ["post", "post", "pre", "pre"]


def test_evaluate_command_equals_loss_over_consecutive_windows(tiny_config, tmp_path, capsys):
    import numpy as np
    from conftest import write_corpus

    import megamix
    from megamix.cli import main

    Trainer(tiny_config("train.steps=2")).run()
    docs = write_corpus(tmp_path / "heldout", num_docs=30, seed=9)
    assert main(["val-loss", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "heldout"),
                 "--micro-batch-size", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    stream = torch.from_numpy(np.concatenate(docs).astype(np.int64))
    model = megamix.load_model(tmp_path / "run")
    n = (len(stream) - 1) // 32 // 2 * 2  # whole batches of 2 windows of 32 + 1 tokens
    windows = torch.stack([stream[i * 32: i * 32 + 33] for i in range(n)])
    with torch.no_grad():
        logits = model(windows[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert result["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["val_tokens"] == n * 32
