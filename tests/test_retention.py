"""Checkpoint retention (``train.keep_last``, ``train.keep_every``): exactly the promised
checkpoints remain, pruning happens only after a newer one has committed, the checkpoint a run
resumed from is never pruned by that run, and a kill in the middle of pruning never leaves a
half-deleted directory under a checkpoint's name."""

from __future__ import annotations

import shutil

import pytest

from megamix.checkpoint import commit as commit_module
from megamix.checkpoint import latest_checkpoint
from megamix.checkpoint.commit import checkpoints_to_prune
from megamix.checkpoint.files import complete_checkpoints
from megamix.train.trainer import Trainer


def steps_on_disk(run) -> list[int]:
    return [step for step, _ in complete_checkpoints(run)]


def test_the_rule_written_out():
    steps = list(range(1, 13))
    assert checkpoints_to_prune(steps, keep_last=3, keep_every=4, protected=set()) == [1, 2, 3, 5, 6, 7, 9]
    assert checkpoints_to_prune(steps, keep_last=3, keep_every=0, protected={2}) == [1, 3, 4, 5, 6, 7, 8, 9]
    assert checkpoints_to_prune(steps, keep_last=0, keep_every=4, protected=set()) == []  # 0: keep all


def test_a_run_keeps_the_last_n_and_every_kth(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=10", "train.save_interval=1", "train.keep_last=2", "train.keep_every=4")).run()
    assert steps_on_disk(tmp_path / "run") == [4, 8, 9, 10]


def test_pruning_waits_for_the_async_commit(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.steps=3", "train.save_interval=1", "train.keep_last=1",
                                  "train.async_save=true"))
    trainer.run()
    assert steps_on_disk(tmp_path / "run") == [3]


def test_the_checkpoint_a_run_resumed_from_is_never_pruned_by_it(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=3", "train.save_interval=3")).run()
    resumed = Trainer(tiny_config("train.steps=8", "train.save_interval=1", "train.keep_last=1"))
    assert resumed.step == 3
    resumed.run()
    assert steps_on_disk(tmp_path / "run") == [3, 8]


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(tiny_config, tmp_path, monkeypatch):
    Trainer(tiny_config("train.steps=2", "train.save_interval=1")).run()  # checkpoints 1 and 2
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if commit_module.TRASH_PREFIX in str(path) and not kwargs.get("ignore_errors"):
            (path / "train_state.json").unlink()  # part of it gone...
            raise KeyboardInterrupt  # ...then the process dies
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(commit_module.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config("train.steps=3", "train.save_interval=1", "train.keep_last=1")).run()
    monkeypatch.setattr(commit_module.shutil, "rmtree", real_rmtree)
    run = tmp_path / "run"
    # What resume sees: only whole checkpoints; the half-deleted one is out of sight, then cleared.
    assert latest_checkpoint(run).name == "step_0000003" and steps_on_disk(run) == [2, 3]
    trainer = Trainer(tiny_config("train.steps=4", "train.save_interval=1", "train.keep_last=1"))
    assert trainer.step == 3 and not list((run / "checkpoints").glob(".trash_*"))
