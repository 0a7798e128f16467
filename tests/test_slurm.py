"""``slurm/train.sbatch`` on a real Slurm: two CPU ranks (gloo) train a tiny model to the end; a
SIGUSR1 (what Slurm sends ahead of a time limit) makes the job checkpoint, requeue itself and
finish with exactly the loss of an uninterrupted job; ``kill -9`` of one rank ends the whole job
well within the collective timeout, with a log that names the rank.

The cluster is ``scripts/slurm_test_cluster.sh start`` (one node, ``auth/none``), found through
``SLURM_CONF``; ``.ci/run`` starts it.  Without a running Slurm these tests are skipped, unless
``MEGAMIX_REQUIRE_SLURM=1`` (set by ``.ci/run``) makes that a failure.  The test kills a rank by
its pid, so it must run on the cluster's only node.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY, final_losses, write_corpus

from megamix.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "train.sbatch"
STEPS = 60
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def slurm_conf() -> str:
    default = Path(os.environ.get("MEGAMIX_SLURM_DIR", "/tmp/megamix-slurm")) / "slurm.conf"
    return os.environ.get("SLURM_CONF") or str(default)


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment for Slurm's commands, or a skip (a failure in CI) when no Slurm answers."""
    # The job runs `python` from PATH: make it this interpreter, whose torch and megamix we test.
    env = dict(os.environ, SLURM_CONF=slurm_conf(), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    reason = None
    if shutil.which("sbatch") is None:
        reason = "Slurm's client commands are not installed"
    else:
        info = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=30)
        states = info.stdout.split()
        if info.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
            reason = f"no Slurm is running at SLURM_CONF={env['SLURM_CONF']} (sinfo: {info.stderr.strip() or states})"
    if reason:
        reason += "; start one with `bash scripts/slurm_test_cluster.sh start` (as .ci/run does)"
        if os.environ.get("MEGAMIX_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm")
    write_corpus(root / "corpus")
    return root


@dataclass
class Job:
    id: str
    workdir: Path
    run: Path

    def info(self, env: dict[str, str]) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], env=env, capture_output=True, text=True,
                             timeout=30).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    @property
    def console(self) -> str:
        """The job's log in the run directory (every attempt, each line prefixed with its rank)."""
        path = self.run / "logs" / f"job_{self.id}" / "console.log"
        return path.read_text() if path.exists() else ""

    @property
    def output(self) -> str:
        """Slurm's own output file, beside the submission (also srun's messages)."""
        path = self.workdir / f"slurm-megamix-{self.id}.out"
        return path.read_text() if path.exists() else ""

    def wait(self, env: dict[str, str], timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info(env)
            if info.get("JobState") in TERMINAL:
                return info
            time.sleep(0.5)
        subprocess.run(["scancel", self.id], env=env, timeout=30)
        raise AssertionError(f"job {self.id} did not finish in {timeout} s:\n{self.output[-4000:]}")


SUBMITTED: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def cancel_leftovers():
    """A test that fails half-way leaves its job running; cancel it, so the next one can start."""
    yield
    if SUBMITTED:
        subprocess.run(["scancel", *SUBMITTED], env=dict(os.environ, SLURM_CONF=slurm_conf()), timeout=30)


def submit(env: dict[str, str], workdir: Path, name: str, *overrides: str) -> Job:
    """sbatch the real script for a tiny config: two ranks on the CPU (gloo), one thread each."""
    run = workdir / name
    config = workdir / f"{name}.yaml"
    cfg = load_config(None, TINY + [f"data.path={workdir / 'corpus'}", f"train.output_dir={run}",
                                    f"train.steps={STEPS}", "train.save_interval=20", *overrides])
    cfg.save(config)
    cmd = ["sbatch", "--parsable", f"--chdir={workdir}", "--gpus-per-node=0", "--ntasks-per-node=2",
           "--cpus-per-task=1", "--export=ALL,OMP_NUM_THREADS=1", str(SBATCH), "--config", str(config)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    SUBMITTED.append(out.stdout.strip().split(";")[0])
    return Job(SUBMITTED[-1], workdir, run)


def wait_for(condition, job: Job, env: dict[str, str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        state = job.info(env).get("JobState")
        assert state not in TERMINAL, f"job {job.id} ended ({state}) too early:\n{job.output[-4000:]}"
        assert time.monotonic() < deadline, f"job {job.id}: timed out:\n{job.output[-4000:]}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, workdir) -> tuple[Job, dict[str, str]]:
    job = submit(slurm_env, workdir, "uninterrupted")
    return job, job.wait(slurm_env)


def test_sbatch_trains_to_completion_on_two_ranks(uninterrupted):
    job, info = uninterrupted
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), job.output[-4000:]
    console = job.console
    assert "2 ranks on 1 node(s)" in console and "megamix-slurm: training finished" in console
    for rank in (0, 1):  # one heartbeat line per rank and logged step, with the step time
        assert re.search(rf"^{rank}: heartbeat rank {rank}/2 .* step {STEPS} step_time \d", console, re.MULTILINE)
    assert (job.run / "checkpoints" / f"step_{STEPS:07d}").is_dir()


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(slurm_env, workdir, uninterrupted):
    job = submit(slurm_env, workdir, "requeued")
    # Signal once training is under way (the handlers are installed before the first step).
    wait_for(lambda: re.search(r"^0: step\s+2 \| loss", job.console, re.MULTILINE), job, slurm_env)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env=slurm_env, check=True, timeout=30)
    info = job.wait(slurm_env)
    output = job.output
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-4000:]
    assert "checkpointed after a stop signal (exit code 75)" in output
    assert f"requeueing job {job.id}" in output
    resumed = re.search(r"resumed from (\S+) at step (\d+)", output)
    assert resumed and 2 <= int(resumed.group(2)) < STEPS, output[-4000:]
    assert Path(resumed.group(1)).name == f"step_{int(resumed.group(2)):07d}"
    assert final_losses(job.run, STEPS) == final_losses(uninterrupted[0].run, STEPS)  # exactly


def test_kill_9_of_one_rank_ends_the_job_within_the_timeout(slurm_env, workdir):
    timeout_s = 30
    job = submit(slurm_env, workdir, "killed", "train.steps=1000", f"parallel.timeout_s={timeout_s}")
    heartbeat = re.compile(r"^1: heartbeat rank 1/2 \(host \S+, pid (\d+)\) step 2 ", re.MULTILINE)
    wait_for(lambda: heartbeat.search(job.console), job, slurm_env)
    os.kill(int(heartbeat.search(job.console).group(1)), signal.SIGKILL)  # the trainer itself, not its launcher
    killed = time.monotonic()
    info = job.wait(slurm_env, timeout=timeout_s + 60)
    elapsed = time.monotonic() - killed
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", job.output[-4000:]
    assert elapsed < timeout_s, f"the job took {elapsed:.0f} s to end after the kill"
    assert "first rank to end: rank 1, killed by signal 9 (SIGKILL)" in job.output
