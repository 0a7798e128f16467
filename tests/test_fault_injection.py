"""Killing the trainer at any moment loses at most the steps since the last checkpoint.

``kill -9`` gives a process no chance to clean up, so what survives is whatever was on disk at that
instant.  The trainer (``python -m megamix train``, one process, CPU fp32) is killed at 20 seeded
random moments: while Python starts or a checkpoint loads, between steps, and while a checkpoint
is being written (a fresh ``.tmp_step_*`` directory is on disk).  After each kill every
``step_*`` directory, the name resume trusts, must load; the restart must resume from the latest
of them; and after the last restart the run's whole loss curve must equal, step for step, that of
a run that was never interrupted.  The same holds for two ranks under ``torchrun`` with
asynchronous saves, the whole job killed while a checkpoint is being written or committed.

Also here: a stop signal (SIGUSR1 from Slurm ahead of a time limit, SIGTERM) makes the loop
checkpoint at the next step boundary and exit with ``EXIT_PREEMPTED``, even when that step is a
regular save step.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, final_losses, write_corpus

from megamix.checkpoint import STEP_DIR, latest_checkpoint
from megamix.checkpoint.dcp import load_checkpoint
from megamix.config import Config, load_config
from megamix.model import Transformer
from megamix.train.optim import build_optimizer
from megamix.train.preemption import EXIT_PREEMPTED, Preempted
from megamix.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
KILLS = 20
SEED = 20261130
# Every other step is a save step, so kills land in and around checkpoint writes often.
OVERRIDES = [f"train.steps={STEPS}", "train.save_interval=2", "train.eval_interval=20"]
STEP_LINE = re.compile(r"^step\s+(\d+) \| loss", re.MULTILINE)
RESUMED_LINE = re.compile(r"^resumed from (\S+) at step (\d+)\b", re.MULTILINE)


def write_config(tmp_path: Path, name: str, extra: list[str] = ()) -> Path:
    """A tiny config whose output directory is ``tmp_path/name``; the corpus is shared."""
    corpus = tmp_path / "corpus"
    if not corpus.with_suffix(".bin").exists():
        write_corpus(corpus)
    cfg = load_config(None, TINY + OVERRIDES + [f"data.path={corpus}", f"train.output_dir={tmp_path / name}",
                                                *extra])
    path = tmp_path / f"{name}.yaml"
    cfg.save(path)
    return path


@pytest.fixture
def start_trainer():
    """``start(config, log)`` runs ``python -m megamix train`` in the background; whatever still
    runs when the test ends (it failed half-way) is killed."""
    started: list[subprocess.Popen] = []

    def start(config: Path, log: Path) -> subprocess.Popen:
        # One thread and unbuffered output: the same arithmetic in every process, and log lines on
        # disk the moment they are written.
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log, "w") as out:
            started.append(subprocess.Popen([sys.executable, "-m", "megamix", "train", "--config", str(config)],
                                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def loss_curve(run: Path) -> dict[int, float]:
    """``{step: training loss}`` of a run's ``metrics.jsonl`` (one line per step after resumes)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(curve) == [r["step"] for r in records if "loss" in r], "a step logged twice"
    return curve


def last_logged_step(log: Path) -> int:
    steps = STEP_LINE.findall(log.read_text())
    return int(steps[-1]) if steps else -1


def fresh_tmp_dirs(run: Path, since: float) -> list[Path]:
    """Checkpoint directories being written by the current process: ``.tmp_step_*`` changed after
    it started (an older one, left by an earlier kill, is only replaced at the same step)."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.glob(".tmp_step_*"):
        try:
            if path.stat().st_mtime > since:
                found.append(path)
        except FileNotFoundError:  # renamed into place just now
            pass
    return found


def wait_until(condition, proc: subprocess.Popen, timeout: float = 60.0, poll: float = 0.002) -> bool:
    """Poll ``condition`` until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for the trainer")


def check_checkpoints(run: Path, cfg: Config, verified: set) -> None:
    """Every directory named like a committed checkpoint must load, with the step its name says.

    ``verified`` holds (name, mtime of its training state) of those already loaded, so each is
    read once."""
    root = run / "checkpoints"
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        match = STEP_DIR.match(path.name)
        if not match:
            continue
        state_file = path / "train_state.json"
        key = (path.name, state_file.stat().st_mtime_ns if state_file.exists() else None)
        if key in verified:
            continue
        model = Transformer(cfg.model, cfg.norm)
        state = load_checkpoint(path, model, build_optimizer(model, cfg.train))  # raises if broken
        assert state["step"] == int(match.group(1)), path
        verified.add(key)


def kill_moments(rng: random.Random) -> list[tuple[str, float, int]]:
    """(kind, delay in seconds, count) for each kill: ``start`` kills ``delay`` s after launch
    (Python's imports, the checkpoint load); ``step`` kills ``delay`` after the count-th step of
    this process; ``save`` kills ``delay`` after the count-th checkpoint write begins."""
    moments = []
    for _ in range(KILLS):
        kind = rng.choices(["start", "step", "save"], weights=[1, 3, 4])[0]
        if kind == "start":
            moments.append((kind, rng.uniform(0.3, 3.0), 0))
        elif kind == "step":
            moments.append((kind, rng.uniform(0.0, 0.03), rng.randint(1, 3)))
        else:  # a save of this tiny model takes about 0.1-0.3 s: the delay spreads kills over it
            moments.append((kind, rng.uniform(0.0, 0.15), rng.randint(1, 2)))
    return moments


def wait_for_moment(moment: tuple[str, float, int], proc: subprocess.Popen, run: Path, log: Path,
                    started: float, resumed_step: int) -> bool:
    """Wait until the kill moment; False if the trainer ended before it."""
    kind, delay, count = moment
    writes: set[Path] = set()

    def reached() -> bool:
        if kind == "step":
            return last_logged_step(log) >= resumed_step + count
        writes.update(fresh_tmp_dirs(run, started))
        return len(writes) >= count

    if kind != "start" and not wait_until(reached, proc):
        return False
    time.sleep(delay)
    return proc.poll() is None


def test_kill_9_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path, start_trainer):
    reference = write_config(tmp_path, "reference")
    proc = start_trainer(reference, tmp_path / "reference.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    expected = final_losses(tmp_path / "reference", STEPS)

    config = write_config(tmp_path, "killed")
    run = tmp_path / "killed"
    cfg = load_config(config)
    verified: set = set()
    during_save = 0
    for attempt, moment in enumerate(kill_moments(random.Random(SEED))):
        log = tmp_path / f"attempt_{attempt:02d}.log"
        latest = latest_checkpoint(run)
        started = time.time()
        proc = start_trainer(config, log)
        resumed_step = int(STEP_DIR.match(latest.name).group(1)) if latest else 0
        alive = wait_for_moment(moment, proc, run, log, started, resumed_step)
        assert alive, f"attempt {attempt} {moment} ended before the kill:\n{log.read_text()[-3000:]}"
        proc.kill()  # SIGKILL
        proc.wait()
        during_save += bool(fresh_tmp_dirs(run, started))

        check_checkpoints(run, cfg, verified)
        # This attempt must have resumed from the latest checkpoint the previous ones left.
        resumed = RESUMED_LINE.search(log.read_text())
        if latest is not None and moment[0] != "start":
            assert resumed and Path(resumed.group(1)) == latest, f"attempt {attempt} did not resume from {latest}"

    log = tmp_path / "final.log"
    latest = latest_checkpoint(run)
    proc = start_trainer(config, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert latest is not None and f"resumed from {latest} at step" in log.read_text()
    check_checkpoints(run, cfg, verified)
    # Several kills must really have hit a checkpoint write, or this test proves little.
    assert during_save >= 3, f"only {during_save} of {KILLS} kills landed during a checkpoint write"
    assert final_losses(run, STEPS) == expected  # exactly: CPU fp32 is deterministic, resume is exact
    assert loss_curve(run) == loss_curve(tmp_path / "reference")  # every step, not only the last


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stop_signal_checkpoints_at_the_next_step_and_exits_preempted(tiny_config, signum):
    """A signal that arrives during a save step (every step is one here) is acted on at once."""
    cfg = tiny_config("train.save_interval=1", "train.steps=8")
    trainer = Trainer(cfg)
    train_step = trainer.train_step

    def signalled_step():
        record = train_step()
        if trainer.step == 3:
            signal.raise_signal(signum)  # as Slurm would, in the middle of the run
        return record

    trainer.train_step = signalled_step
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(Preempted) as stopped:
            trainer.run()
    finally:  # the trainer leaves its handlers in place for the exiting process; this one goes on
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert stopped.value.code == EXIT_PREEMPTED and stopped.value.step == 3
    assert latest_checkpoint(cfg.train.output_dir).name == "step_0000003"
    assert Trainer(cfg).step == 3  # and the next start resumes there


def handles(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (its SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_megamix_train_answers_each_stop_signal_with_a_checkpoint_and_exit_75(tmp_path, start_trainer, signum):
    config = write_config(tmp_path, "run", ["train.steps=5000", "train.save_interval=0"])
    proc = start_trainer(config, tmp_path / "train.log")
    assert wait_until(lambda: last_logged_step(tmp_path / "train.log") >= 2, proc), (tmp_path / "train.log").read_text()
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "train.log").read_text()[-3000:]
    step = last_logged_step(tmp_path / "train.log")
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and int(STEP_DIR.match(checkpoint.name).group(1)) >= step
    assert f"{signum.name} received: checkpoint saved" in (tmp_path / "train.log").read_text()


def test_a_stop_signal_during_start_up_exits_at_once_with_nothing_to_save(tmp_path, start_trainer):
    config = write_config(tmp_path, "run", ["train.steps=5000"])
    proc = start_trainer(config, tmp_path / "train.log")
    assert wait_until(lambda: handles(proc.pid, signal.SIGTERM), proc, timeout=30)  # before torch is even imported
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == EXIT_PREEMPTED
    assert time.monotonic() - sent < 10
    assert "during start-up: nothing to save" in (tmp_path / "train.log").read_text()
    assert latest_checkpoint(tmp_path / "run") is None


def test_a_second_ctrl_c_aborts_without_waiting_for_the_checkpoint(tmp_path, start_trainer):
    config = write_config(tmp_path, "run", ["train.steps=5000", "train.save_interval=0"])
    proc = start_trainer(config, tmp_path / "train.log")
    assert wait_until(lambda: last_logged_step(tmp_path / "train.log") >= 1, proc)
    proc.send_signal(signal.SIGINT)
    assert wait_until(lambda: "Ctrl-C again to abort" in (tmp_path / "train.log").read_text(), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) not in (0, EXIT_PREEMPTED)


def test_two_ranks_with_async_saves_killed_while_saving_resume_on_the_same_curve(tmp_path):
    """torchrun, dp=2 (ZeRO-2), ``train.async_save``: the whole job is SIGKILLed at seeded moments
    while a checkpoint is being written or committed (a fresh ``.tmp_step_*`` directory on disk, or
    just after); each restart resumes from a complete checkpoint and the curve ends as the
    uninterrupted one."""
    steps = 24
    extra = [f"train.steps={steps}", "train.save_interval=3", "train.async_save=true", "parallel.zero=2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def launch(config: Path, log: Path) -> subprocess.Popen:
        from conftest import free_port

        with open(log, "w") as out:
            return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                                     f"--master-port={free_port()}", "-m", "megamix", "train", "--config", str(config)],
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    reference = write_config(tmp_path, "reference", extra)
    proc = launch(reference, tmp_path / "reference.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    config, run = write_config(tmp_path, "killed", extra), tmp_path / "killed"
    cfg = load_config(config)
    rng, verified, during_save = random.Random(SEED + 1), set(), 0
    for attempt in range(6):
        log = tmp_path / f"attempt_{attempt}.log"
        started = time.time()
        proc = launch(config, log)
        try:
            alive = wait_until(lambda since=started: bool(fresh_tmp_dirs(run, since)), proc, timeout=300)
            if alive:
                time.sleep(rng.uniform(0.0, 0.4))  # into the write, the commit barrier, or the next step
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if not alive:  # the run finished before this kill
            break
        during_save += 1
        check_checkpoints(run, cfg, verified)
    proc = launch(config, tmp_path / "final.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()[-3000:]
    check_checkpoints(run, cfg, verified)
    assert during_save >= 3
    assert loss_curve(run) == loss_curve(tmp_path / "reference")
