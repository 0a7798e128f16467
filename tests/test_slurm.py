"""``slurm/train.sbatch`` on a real Slurm: two CPU ranks (gloo) train a tiny model to the end; a
SIGUSR1 (what Slurm sends ahead of a time limit) makes the job checkpoint, requeue itself and
finish with exactly the loss of an uninterrupted job; ``kill -9`` of one rank ends the whole job
well within the collective timeout, with a log that names the rank.  A checkout, config and run
directory whose paths hold spaces train too; a layout the allocation cannot run fails before
``srun``; the requeue decision (every rank exited 75, a new checkpoint, ``MEGAMIX_MAX_REQUEUES``)
is checked with a stand-in launcher (``MEGAMIX_LAUNCHER``) that exits as told without training.

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


def submit(env: dict[str, str], workdir: Path, name: str, *overrides: str, sbatch: Path = SBATCH,
           corpus: Path | None = None, extra_env: dict[str, str] | None = None) -> Job:
    """sbatch the real script for a tiny config: two ranks on the CPU (gloo), one thread each."""
    run = workdir / name
    config = workdir / f"{name}.yaml"
    cfg = load_config(None, TINY + [f"data.path={corpus or workdir / 'corpus'}", f"train.output_dir={run}",
                                    f"train.steps={STEPS}", "train.save_interval=20", *overrides])
    cfg.save(config)
    cmd = ["sbatch", "--parsable", f"--chdir={workdir}", "--gpus-per-node=0", "--ntasks-per-node=2",
           "--cpus-per-task=1", "--export=ALL,OMP_NUM_THREADS=1", str(sbatch), "--config", str(config)]
    out = subprocess.run(cmd, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=60)
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


def test_checkout_config_and_run_dir_with_spaces(slurm_env, workdir):
    """The scripts, the config, the corpus and the run directory all under a path with spaces."""
    checkout = workdir / "a checkout"
    (checkout / "slurm").mkdir(parents=True)
    for name in ("train.sbatch", "launch.sh"):
        shutil.copy2(ROOT / "slurm" / name, checkout / "slurm" / name)
    (checkout / "megamix").symlink_to(ROOT / "megamix")
    for suffix in (".bin", ".idx"):
        shutil.copy2(workdir / f"corpus{suffix}", checkout / f"my corpus{suffix}")
    job = submit(slurm_env, checkout, "run dir", "train.steps=3", sbatch=checkout / "slurm" / "train.sbatch",
                 corpus=checkout / "my corpus")
    info = job.wait(slurm_env)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.output[-4000:]
    assert "ok: 2 processes as tp=1 pp=1 dp=2" in job.console and "training finished" in job.console
    assert (job.run / "checkpoints" / "step_0000003" / "train_state.json").is_file()


def test_layout_the_allocation_cannot_run_fails_before_srun(slurm_env, workdir):
    """global batch 12 = micro batch 4 × dp 2 × 1.5: `megamix check` refuses it, no rank starts."""
    job = submit(slurm_env, workdir, "bad_layout", "train.global_batch_size=12")
    start = time.monotonic()
    info = job.wait(slurm_env, timeout=120)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), job.output[-4000:]
    assert time.monotonic() - start < 60
    console = job.console
    assert "megamix: config error: train.global_batch_size: 12 is not a multiple" in console, console
    assert "config check failed for 2 ranks; no rank was started" in console
    assert not list(job.run.glob("logs/job_*/attempt_0/rank_*.exit")) and not re.search(r"^\d+: ", console, re.M)


def test_sweep_submits_each_point_once_and_follows_it_to_the_end(slurm_env, workdir):
    """``megamix sweep --submit``: one job per point; submitting again while they are queued or
    running, or after they finished, submits nothing; the status reads both runs as finished."""
    base = workdir / "sweep_base.yaml"
    load_config(None, TINY + [f"data.path={workdir / 'corpus'}", "train.steps=3", "train.eval_interval=0"]).save(base)
    out = workdir / "sweep"
    cmd = [sys.executable, "-m", "megamix", "sweep", "--out", str(out), "--config", str(base), "--grid",
           "norm.scheme=pre,post", "--world-size", "2", "--submit", "--sbatch-args",
           "--gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 --export=ALL,OMP_NUM_THREADS=1"]

    def submit_sweep() -> list[tuple[str, str]]:
        done = subprocess.run(cmd, env=slurm_env, cwd=workdir, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        jobs = re.findall(r"^submitted (\S+): job (\d+)$", done.stdout, re.MULTILINE)
        SUBMITTED.extend(job for _, job in jobs)  # cancelled if the test fails half-way
        return jobs

    first = submit_sweep()
    assert [name for name, _ in first] == ["scheme=pre", "scheme=post"]
    assert submit_sweep() == []  # queued or running: left alone
    for name, job in first:
        info = Job(job, workdir, out / "runs" / name).wait(slurm_env)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (out / "slurm" / f"{name}-{job}.out")
        assert (out / "runs" / name / "checkpoints" / "step_0000003" / "train_state.json").is_file()
    assert submit_sweep() == []  # finished: left alone
    status = subprocess.run([sys.executable, "-m", "megamix", "sweep", "--out", str(out), "--status"], env=slurm_env,
                            capture_output=True, text=True, timeout=120).stdout
    assert all(re.search(rf"^\| {name} \| .* \| 3/3 \| .* \| finished \|$", status, re.M) for name, _ in first)
    manifest = (out / "sweep.json").read_text()
    assert all(f'"{job}"' in manifest for _, job in first)

    # A point the allocation cannot run (no --world-size given, so the sweep could not tell): its job
    # fails in the batch script's config check, and the status says why, from the job's log.
    failing = [*cmd[:cmd.index("--out") + 1], str(workdir / "sweep_pp4"), "--config", str(base), "--grid",
               "parallel.pp=4", "--submit", "--sbatch-args", cmd[-1]]
    done = subprocess.run(failing, env=slurm_env, cwd=workdir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    job = re.search(r"^submitted pp=4: job (\d+)$", done.stdout, re.MULTILINE).group(1)
    SUBMITTED.append(job)
    assert Job(job, workdir, workdir / "sweep_pp4" / "runs" / "pp=4").wait(slurm_env)["JobState"] == "FAILED"
    status = subprocess.run([sys.executable, "-m", "megamix", "sweep", "--out", str(workdir / "sweep_pp4"), "--status"],
                            env=slurm_env, capture_output=True, text=True, timeout=120).stdout
    assert f"| not started (job {job}: failed): megamix: config error: parallel.tp: tp×pp = 4 does not divide the " \
           "world size 2 |" in status, status


# ----------------------------------------------------------------------------------------------
# The requeue decision, with a stand-in launcher: each rank records the exit code it is told
# (FAKE_CODES, by rank), after rank 0 optionally wrote a complete checkpoint one step past the
# newest (FAKE_SAVE=1); every rank records before any exits, as real ranks do after the
# collective checkpoint, so srun's --kill-on-bad-exit cannot cut one short.

FAKE_LAUNCHER = """#!/usr/bin/env bash
set -u
run_dir=$MEGAMIX_EXIT_DIR/../../..
if [[ $SLURM_PROCID == 0 && ${FAKE_SAVE:-0} == 1 ]]; then
    n=$(find "$run_dir/checkpoints" -maxdepth 1 -name 'step_*' 2>/dev/null | wc -l)
    dir=$(printf '%s/checkpoints/step_%07d' "$run_dir" $((n + 1)))
    mkdir -p "$dir" && echo '{}' >"$dir/train_state.json"
fi
read -r -a codes <<<"$FAKE_CODES"
code=${codes[$SLURM_PROCID]}
echo "$code $(date +%s.%N)" >"$MEGAMIX_EXIT_DIR/rank_$SLURM_PROCID.exit"
while (($(find "$MEGAMIX_EXIT_DIR" -name 'rank_*.exit' | wc -l) < SLURM_NTASKS)); do sleep 0.05; done
echo "fake rank $SLURM_PROCID exits $code"
exit "$code"
"""


@pytest.fixture(scope="module")
def fake_jobs(slurm_env, workdir) -> dict[str, Job]:
    """Every stand-in job submitted at once (they run side by side on the node's slots)."""
    launcher = workdir / "fake launch.sh"
    launcher.write_text(FAKE_LAUNCHER)
    launcher.chmod(0o755)
    cases = {
        "no_progress": {"FAKE_CODES": "75 75"},
        "rank_crashed": {"FAKE_CODES": "75 1", "FAKE_SAVE": "1"},
        "capped": {"FAKE_CODES": "75 75", "FAKE_SAVE": "1", "MEGAMIX_MAX_REQUEUES": "1"},
        "bad_max_requeues": {"FAKE_CODES": "0 0", "MEGAMIX_MAX_REQUEUES": "1O"},
    }
    return {name: submit(slurm_env, workdir, name, extra_env={"MEGAMIX_LAUNCHER": str(launcher), **extra})
            for name, extra in cases.items()}


def test_no_requeue_without_a_new_checkpoint(slurm_env, fake_jobs):
    job = fake_jobs["no_progress"]
    info = job.wait(slurm_env, timeout=120)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), job.output[-4000:]
    assert "not requeueing: no new checkpoint in this attempt (latest complete: no checkpoint" in job.output


def test_no_requeue_when_a_rank_did_not_checkpoint(slurm_env, fake_jobs):
    job = fake_jobs["rank_crashed"]
    info = job.wait(slurm_env, timeout=120)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), job.output[-4000:]
    assert ("not requeueing: not every rank checkpointed after the stop signal (rank 1: exit code 1); "
            "submit again to resume from the latest complete checkpoint (step 1)") in job.output


def test_requeue_after_progress_up_to_max_requeues(slurm_env, fake_jobs):
    """Attempt 0 makes progress and is requeued; attempt 1 does too, but MEGAMIX_MAX_REQUEUES=1."""
    job = fake_jobs["capped"]
    info = job.wait(slurm_env, timeout=180)
    output = job.output
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "1"), output[-4000:]
    assert f"requeueing job {job.id} (this attempt: no checkpoint -> step 1); it will resume from step 1" in output
    assert "not requeueing: 1 requeues already (MEGAMIX_MAX_REQUEUES=1)" in output
    assert [p.read_text().split() for p in sorted(job.run.glob("logs/job_*/attempt_*/start_step"))] == [["-1"], ["1"]]


def test_invalid_max_requeues_fails_before_srun(slurm_env, fake_jobs):
    job = fake_jobs["bad_max_requeues"]
    info = job.wait(slurm_env, timeout=120)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), job.output[-4000:]
    assert "MEGAMIX_MAX_REQUEUES='1O' is not a non-negative integer" in job.output
    assert "fake rank" not in job.output and not job.run.exists()
