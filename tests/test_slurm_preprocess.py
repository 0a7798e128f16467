"""``slurm/preprocess.sh`` on a real Slurm: a job array tokenizes slices of the inputs, a dependent
job merges them, and the corpus is byte for byte what one process writes.  A task that fails
(a malformed line) gets the merge job cancelled; after the input is fixed, the same command
finishes, reusing the shards the other tasks had finished.  The checkout, the inputs and the
output all sit under paths with spaces.

Needs the cluster of ``scripts/slurm_test_cluster.sh`` (see ``tests/test_slurm.py``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_preprocess import c4_shards, read_bytes, run_tool, sp_model, texts  # noqa: F401 (fixtures)
from test_slurm import TERMINAL, slurm_env  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
SUBMITTED: list[str] = []


@pytest.fixture(autouse=True)
def cancel_leftovers(slurm_env):  # noqa: F811
    """A failing test leaves its jobs queued; cancel them so the next test's can start."""
    yield
    if SUBMITTED:
        subprocess.run(["scancel", *SUBMITTED], env=slurm_env, timeout=30)


def job_state(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}


def wait_until_ended(env: dict[str, str], job_id: str, workdir: Path, timeout: float = 120) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_state(env, job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(workdir.glob("slurm-*.out")))
    raise AssertionError(f"job {job_id} did not end in {timeout} s:\n{logs}")


def submit(env: dict[str, str], checkout: Path, workdir: Path, *tool_args) -> tuple[str, str]:
    """One preprocess.sh command: the array job's id and the merge job's."""
    cmd = ["bash", str(checkout / "slurm" / "preprocess.sh"), "--array-tasks", "3", "--sbatch", "--cpus-per-task=1",
           *map(str, tool_args)]
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = re.search(r"submitted array job (\d+) \(3 tasks\) and merge job (\d+)", proc.stdout)
    assert ids, proc.stdout
    SUBMITTED.extend(ids.groups())
    return ids.group(1), ids.group(2)


def test_job_array_then_merge_equals_one_process(slurm_env, tmp_path, texts, sp_model):  # noqa: F811
    workdir = tmp_path / "pre process"
    checkout = tmp_path / "a checkout"
    (checkout / "slurm").mkdir(parents=True)
    for name in ("preprocess.sh", "preprocess.sbatch"):
        shutil.copy2(ROOT / "slurm" / name, checkout / "slurm" / name)
    for name in ("tools", "megamix"):
        (checkout / name).symlink_to(ROOT / name)
    inputs = c4_shards(workdir / "c4 in", texts[: 4 * 60], 4)  # tasks: {0, 3}, {1}, {2}
    good = Path(inputs[2]).read_bytes()
    with open(inputs[2], "ab") as f:
        f.write(b'{"text": "cut off\n')  # trailing bytes that are not gzip: a corrupt download
    args = ["--input", workdir / "c4 in" / "*.json.gz", "--output-prefix", workdir / "array out",
            "--tokenizer", sp_model]

    array, merge = submit(slurm_env, checkout, workdir, *args)
    merge_info = wait_until_ended(slurm_env, merge, workdir)
    assert merge_info["JobState"] == "CANCELLED", merge_info  # --kill-on-invalid-dep: a task failed
    task2 = (workdir / f"slurm-megamix-preprocess-{array}_2.out").read_text()
    assert f"preprocess_c4: {inputs[2]}: cannot read" in task2 and "Traceback" not in task2, task2
    assert not Path(f"{workdir / 'array out'}.bin").exists()

    Path(inputs[2]).write_bytes(good)
    array, merge = submit(slurm_env, checkout, workdir, *args)
    merge_info = wait_until_ended(slurm_env, merge, workdir)
    merge_log = (workdir / f"slurm-megamix-preprocess-merge-{merge}.out").read_text()
    assert (merge_info["JobState"], merge_info["ExitCode"]) == ("COMPLETED", "0:0"), merge_log
    slices = [(workdir / f"slurm-megamix-preprocess-{array}_{i}.out").read_text() for i in range(3)]
    assert re.search(r"^inputs\s+2 of 4 \(2 reused", slices[0], re.MULTILINE), slices[0]
    assert re.search(r"^inputs\s+1 of 4 \(1 reused", slices[1], re.MULTILINE), slices[1]
    assert re.search(r"^inputs\s+1 of 4 \(0 reused", slices[2], re.MULTILINE), slices[2]

    run_tool("--input", *inputs, "--output-prefix", workdir / "one process", "--tokenizer", sp_model,
             "--workers", 1)
    assert read_bytes(workdir / "array out") == read_bytes(workdir / "one process")
    assert Path(f"{workdir / 'array out'}.json").read_bytes() == Path(f"{workdir / 'one process'}.json").read_bytes()
    assert not Path(f"{workdir / 'array out'}.shards").exists()
