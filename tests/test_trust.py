"""Trust: nothing a run reads can run code, nothing a user changes is silently ignored, nothing is
lost.  Each test pins one hole a hostile or careless user found, against what should happen."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import TINY, write_corpus

from megamix.checkpoint import CheckpointError, latest_checkpoint
from megamix.checkpoint.dcp import _state, load_checkpoint
from megamix.config import ConfigError, load_config, validate
from megamix.train.resume import ResumeMismatchError
from megamix.train.trainer import NonFiniteError, Trainer

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs ``touch MARKER``: what an attacker plants in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint never runs code.


def plant_in_dcp_byte_item(checkpoint: Path, trainer: Trainer, marker: Path) -> None:
    """Rewrite ``checkpoint``'s shards with one optimizer value (a byte item) replaced by a payload."""
    state = _state(trainer.engine.model, trainer.engine.optimizer)
    key = next(k for k in state["optim"] if k.startswith("param_groups.") and k.endswith(".lr"))
    state["optim"][key] = Payload(marker)
    for shard in checkpoint.glob("*.distcp"):
        shard.unlink()
    dcp.save(state, checkpoint_id=checkpoint)


def test_a_payload_in_a_dcp_byte_item_never_runs_on_resume_export_or_load_model(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.steps=2"))
    trainer.run()
    checkpoint = latest_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned"
    plant_in_dcp_byte_item(checkpoint, trainer, marker)
    # The payload is live: torch's own reader with its default planner runs it.
    dcp.load(_state(trainer.engine.model, trainer.engine.optimizer), checkpoint_id=checkpoint)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="not plain data"):  # resume
        Trainer(tiny_config("train.steps=4"))
    with pytest.raises(CheckpointError, match="not plain data"):
        load_checkpoint(checkpoint, trainer.engine.model, trainer.engine.optimizer)
    import megamix
    from megamix.hf.export import export_checkpoint

    megamix.load_model(checkpoint)  # the weights alone hold no byte item: safe to read
    export_checkpoint(checkpoint, tmp_path / "hf", dtype="fp32")
    assert not marker.exists()


def test_a_payload_in_place_of_a_weight_never_runs_in_load_model_export_or_analysis(tiny_config, tmp_path, corpus):
    trainer = Trainer(tiny_config("train.steps=2"))
    trainer.run()
    checkpoint = latest_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned"
    state = _state(trainer.engine.model, trainer.engine.optimizer)
    state["model"]["layers.1.mlp.up_proj.weight"] = Payload(marker)  # saved as a pickled byte item
    for shard in checkpoint.glob("*.distcp"):
        shard.unlink()
    dcp.save(state, checkpoint_id=checkpoint)
    import megamix
    from megamix.analysis.report import analyze_checkpoint
    from megamix.hf.export import export_checkpoint

    for attempt in (lambda: megamix.load_model(checkpoint),
                    lambda: export_checkpoint(checkpoint, tmp_path / "hf", dtype="fp32"),
                    lambda: analyze_checkpoint(checkpoint, corpus[0], samples=4, batch_size=2, grad_batches=1),
                    lambda: Trainer(tiny_config("train.steps=4"))):
        with pytest.raises(CheckpointError):
            attempt()
    assert not marker.exists()


def test_a_payload_in_the_metadata_never_runs(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=2")).run()
    checkpoint = latest_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned"
    import pickle

    (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    import megamix

    for attempt in (lambda: Trainer(tiny_config("train.steps=4")), lambda: megamix.load_model(checkpoint)):
        with pytest.raises(CheckpointError, match=r"\.metadata"):
            attempt()
    assert not marker.exists()


def test_eval_runs_an_exports_code_only_when_it_is_megamixs_own_or_trusted(tiny_config, tmp_path):
    pytest.importorskip("transformers")
    from megamix.hf.export import export_checkpoint
    from megamix.hf.harness import RemoteCodeError, trust_remote_code

    Trainer(tiny_config("train.steps=2", "norm.scheme=post")).run()
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="fp32")
    assert trust_remote_code(out) is True  # byte-identical to the packaged modeling_megamix.py
    modeling = out / "modeling_megamix.py"
    modeling.write_text(modeling.read_text() + "\nimport os; os.system('touch pwned')\n")
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        trust_remote_code(out)
    assert trust_remote_code(out, explicitly=True) is True
    config = json.loads((out / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "evil.Model"
    (out / "config.json").write_text(json.dumps(config))
    shutil.copyfile(ROOT / "megamix" / "hf" / "modeling_megamix.py", modeling)
    with pytest.raises(RemoteCodeError):  # our file, but the config points elsewhere
        trust_remote_code(out)


def test_exports_of_earlier_megamix_versions_stay_trusted(tiny_config, tmp_path, monkeypatch):
    """An export's modeling file that is an earlier megamix's (its SHA-256 listed) is trusted; the
    list holds every version in this checkout's git history, so changing the file means listing
    the old one."""
    import hashlib
    import subprocess

    pytest.importorskip("transformers")
    from megamix.hf import harness
    from megamix.hf.export import export_checkpoint

    Trainer(tiny_config("train.steps=2", "norm.scheme=post")).run()
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="fp32")
    modeling = out / "modeling_megamix.py"
    older = modeling.read_bytes().replace(b"A LLaMA whose blocks", b"A LLaMA, whose blocks")
    modeling.write_bytes(older)
    with pytest.raises(harness.RemoteCodeError):
        harness.trust_remote_code(out)
    monkeypatch.setattr(harness, "EARLIER_MODELING_SHA256", frozenset({hashlib.sha256(older).hexdigest()}))
    assert harness.trust_remote_code(out) is True
    monkeypatch.undo()

    path = "megamix/hf/modeling_megamix.py"
    log = subprocess.run(["git", "log", "--format=%H", "--", path], cwd=ROOT, capture_output=True, text=True)
    if log.returncode != 0 or not log.stdout.strip():
        pytest.skip("not a git checkout with history")
    current = (ROOT / path).read_bytes()
    for commit in log.stdout.split():
        data = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, check=True).stdout
        if data != current:
            assert hashlib.sha256(data).hexdigest() in harness.EARLIER_MODELING_SHA256, commit


# ----------------------------------------------------------------------------------------------
# Nothing a user changes is silently ignored.


def test_resuming_with_a_different_model_or_data_is_a_named_error(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=2", "norm.scheme=mix", "norm.alpha=0.5")).run()
    for change, field in (("norm.alpha=0.25", "norm.alpha"), ("model.rope_theta=500000.0", "model.rope_theta"),
                          ("norm.scheme=pre", "norm.scheme"), ("data.seed=7", "data.seed"),
                          ("data.seq_len=16", "data.seq_len")):
        with pytest.raises(ResumeMismatchError, match=field):
            Trainer(tiny_config("train.steps=4", "norm.scheme=mix", "norm.alpha=0.5", change))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "alpha: 0.5" in saved  # the run's config was not overwritten by a refused one
    # Allowed changes resume; an accepted identity change too.
    Trainer(tiny_config("train.steps=4", "norm.scheme=mix", "norm.alpha=0.5", "train.lr=5e-4"))
    Trainer(tiny_config("train.steps=4", "norm.scheme=mix", "norm.alpha=0.5", "data.seed=7",
                        "train.accept_changes=[data.seed]"))


@pytest.mark.parametrize("override,field", [("train.lr=.inf", "train.lr"), ("model.norm_eps=.nan", "model.norm_eps"),
                                            ("train.adam_beta1=5", "train.adam_beta1"),
                                            ("train.adam_beta2=1.0", "train.adam_beta2"),
                                            ("train.nonfinite=ignore", "train.nonfinite"),
                                            ("train.accept_changes=[nonsense]", "train.accept_changes")])
def test_non_finite_numbers_and_impossible_betas_are_config_errors(override, field):
    with pytest.raises(ConfigError, match=field):
        validate(load_config(None, [override]))


# ----------------------------------------------------------------------------------------------
# Nothing is lost.


def poison_step(trainer: Trainer, step: int) -> None:
    """Make the gradients of ``step`` (1-based) NaN, as an overflow would."""

    def hook(engine):
        if trainer.step + 1 == step:
            for p in engine.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))

    trainer.engine.before_optimizer_step.append(hook)


def test_a_non_finite_step_stops_the_run_keeping_the_last_good_checkpoint(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.steps=6", "train.save_interval=2"))
    poison_step(trainer, 4)
    with pytest.raises(NonFiniteError, match="step 4"):
        trainer.run()
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"
    assert all(torch.isfinite(p).all() for p in trainer.engine.model.parameters())  # the step was not applied


def test_skip_mode_skips_a_non_finite_step_and_trains_on(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.steps=5", "train.nonfinite=skip"))
    poison_step(trainer, 3)
    before = {}

    def remember(engine):
        if trainer.step + 1 == 3:
            before.update({n: p.detach().clone() for n, p in engine.model.named_parameters()})

    trainer.engine.before_optimizer_step.insert(0, remember)
    history = trainer.run()
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5] and history[2].get("skipped")
    assert all(torch.isfinite(p).all() for p in trainer.engine.model.parameters())
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 3, "event": "nonfinite_step_skipped"} in events


def test_a_second_run_on_the_same_directory_is_refused_naming_the_holder(tiny_config, tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = tmp_path / "cfg.yaml"
    load_config(None, TINY + [f"data.path={tmp_path / 'corpus'}", f"train.output_dir={tmp_path / 'run'}",
                              "train.steps=400"]).save(cfg)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "megamix", "train", "--config", str(cfg)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = __import__("time").monotonic() + 60
        while not (tmp_path / "run" / "metrics.jsonl").exists():
            assert first.poll() is None and __import__("time").monotonic() < deadline
            __import__("time").sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "megamix", "train", "--config", str(cfg)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"pid {first.pid}" in second.stderr and "in use" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


# ----------------------------------------------------------------------------------------------
# --overwrite replaces a previous export and nothing else.


def test_overwrite_refuses_anything_but_a_previous_export(tiny_config, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_to_hf

    Trainer(tiny_config("train.steps=2")).run()
    (tmp_path / "sibling_run").mkdir()
    (tmp_path / "sibling_run" / "precious.txt").write_text("keep me")
    run = tmp_path / "run"

    def convert(output: Path) -> int:
        return convert_to_hf.main(["--checkpoint", str(run), "--output", str(output), "--dtype", "fp32",
                                   "--overwrite"])

    (run / "analysis").mkdir()
    (run / "analysis" / "config.json").write_text("{}")  # even export-like files, when inside a run
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for target in (run, tmp_path, run / "checkpoints", latest_checkpoint(run), run / "analysis",
                   tmp_path / "sibling_run"):
        assert convert(target) == 1, target
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing deleted
    assert convert(tmp_path / "hf") == 0 and convert(tmp_path / "hf") == 0  # a previous export is replaced
    assert (tmp_path / "hf" / "config.json").is_file() and not (tmp_path / ".hf.old").exists()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert convert(tmp_path / "hf") == 1 and (tmp_path / "hf" / "notes.txt").exists()


# ----------------------------------------------------------------------------------------------
# Errors reach the user as one line, with an exit code that says which kind.


def test_commands_print_one_line_errors_and_debug_shows_the_traceback(tiny_config, tmp_path, capsys):
    from megamix.cli import main

    Trainer(tiny_config("train.steps=2")).run()
    run = str(tmp_path / "run")
    capsys.readouterr()
    assert main(["val-loss", "--checkpoint", run, "--data", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err and "file not found" in err
    assert main(["val-loss", "--checkpoint", str(tmp_path / "nothing"), "--data", run]) == 1
    assert "neither a complete checkpoint" in capsys.readouterr().err
    assert main(["val-loss", "--checkpoint", run, "--data", str(tmp_path / "corpus"), "--micro-batch-size", "0"]) == 1
    assert "--micro-batch-size must be positive" in capsys.readouterr().err
    write_corpus(tmp_path / "tiny", num_docs=1)  # fewer tokens than one batch: an error, not "ppl 1.00 over 0 tokens"
    assert main(["val-loss", "--checkpoint", run, "--data", str(tmp_path / "tiny")]) == 1
    assert "not one batch" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("megamix: config error: config: cannot read")
    with pytest.raises(Exception, match="nowhere"):
        main(["val-loss", "--checkpoint", run, "--data", str(tmp_path / "nowhere"), "--debug"])


# ----------------------------------------------------------------------------------------------
# The sample order does not depend on how long a run is; a run resumes from the samples consumed.


def spy_samples(trainer: Trainer) -> list[torch.Tensor]:
    """Record the micro-batches each step trains on."""
    seen: list[torch.Tensor] = []
    forward_backward = trainer.engine.forward_backward

    def spy(micro_batches):
        seen.append(torch.cat(micro_batches).clone())
        return forward_backward(micro_batches)

    trainer.engine.forward_backward = spy
    return seen


def test_extending_a_run_reads_and_trains_exactly_what_the_longer_run_would(tiny_config, tmp_path):
    constant = ["train.lr_schedule=constant", "train.eval_interval=0"]
    planned = Trainer(tiny_config("train.steps=12", *constant, f"train.output_dir={tmp_path / 'planned'}"))
    planned_samples = spy_samples(planned)
    planned_curve = {r["step"]: r["loss"] for r in planned.run()}
    Trainer(tiny_config("train.steps=6", *constant, f"train.output_dir={tmp_path / 'extended'}")).run()
    extended = Trainer(tiny_config("train.steps=12", *constant, f"train.output_dir={tmp_path / 'extended'}"))
    assert extended.step == 6
    extended_samples = spy_samples(extended)
    extended_curve = {r["step"]: r["loss"] for r in extended.run()}
    for a, b in zip(planned_samples[6:], extended_samples):
        assert torch.equal(a, b)
    assert {s: v for s, v in planned_curve.items() if s > 6} == extended_curve  # bit-exact on CPU


def test_a_new_global_batch_size_continues_with_the_next_unread_sample(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=3", "train.global_batch_size=8")).run()  # 24 samples consumed
    resumed = Trainer(tiny_config("train.steps=5", "train.global_batch_size=16", "train.micro_batch_size=8"))
    assert (resumed.step, resumed.consumed_samples) == (3, 24)
    seen = spy_samples(resumed)
    resumed.run()
    expected = torch.stack([resumed.data.train[i] for i in range(24, 56)])
    assert torch.equal(torch.cat(seen), expected)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000005" / "train_state.json").read_text())
    assert state["consumed_samples"] == 56


def test_loader_workers_train_exactly_like_the_main_thread(tiny_config, tmp_path):
    main = Trainer(tiny_config("train.steps=4", f"train.output_dir={tmp_path / 'main'}")).run()
    workers = Trainer(tiny_config("train.steps=4", "data.num_workers=2", f"train.output_dir={tmp_path / 'w'}")).run()
    assert [r["loss"] for r in main] == [r["loss"] for r in workers]


def test_a_token_beyond_the_vocabulary_is_a_named_error_before_or_at_the_batch(tiny_config, tmp_path):
    from megamix.data.gpt_dataset import DataError
    from megamix.data.indexed import IndexedDatasetWriter
    from megamix.data.sidecar import write_sidecar

    bad = tmp_path / "wide"
    with IndexedDatasetWriter(bad, "uint16") as writer:
        for i in range(200):
            writer.add_document([(i * 7 + j) % 600 for j in range(40)])  # ids up to 599 > vocab 512
    with pytest.raises(DataError, match=r"sample \d+ holds token id 5\d\d >= model.vocab_size 512"):
        Trainer(tiny_config(f"data.path={bad}", "train.steps=2")).run()
    write_sidecar(bad, tokenizer_name="t", tokenizer_fingerprint="f" * 64, vocab_size=600, eos_id=None,
                  documents=200, tokens=8000, max_id=599)
    with pytest.raises(DataError, match=r"token ids up to 599 .* >= model.vocab_size 512"):
        Trainer(tiny_config(f"data.path={bad}", "train.steps=2", f"train.output_dir={tmp_path / 'other'}"))
