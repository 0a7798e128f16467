#!/usr/bin/env python3
"""Start-up cost of ``megamix train`` and ``megamix plan`` on one process: this checkout against
another revision (default: v0.1, the commit before the engine redesign), measured in the same run,
interleaved.

    python benchmarks/startup.py [--baseline REV] [--rounds 5]

Three numbers per system, medians over the rounds: importing what ``megamix train`` needs
(``python -c 'import megamix.train.trainer'``), the time from launching ``megamix train`` on the
tiny config to its first logged step, and ``megamix plan --config configs/llama_7b.yaml``.  The
baseline is checked out with ``git worktree`` into a temporary directory; both run on the same
corpus.  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def timed(command: list[str], cwd: Path, until: str | None = None) -> float:
    """Seconds from launch to exit (or to the first output line containing ``until``, then killed)."""
    env = dict(os.environ, PYTHONPATH=str(cwd), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if until is None:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{command} failed:\n{out[-2000:]}")
        return time.perf_counter() - start
    for line in proc.stdout:
        if until in line:
            elapsed = time.perf_counter() - start
            proc.kill()
            proc.wait()
            return elapsed
    raise RuntimeError(f"{command} ended without printing {until!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="aee8f11", help="git revision to compare with (default: v0.1)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    from conftest import write_corpus

    with tempfile.TemporaryDirectory(prefix="megamix-startup-") as scratch:
        scratch = Path(scratch)
        baseline = scratch / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            write_corpus(scratch / "corpus", num_docs=400)
            systems = {f"baseline ({args.baseline})": baseline, "this checkout": ROOT}
            results: dict[str, dict[str, list[float]]] = {name: {"import": [], "first step": [], "plan 7b": []}
                                                          for name in systems}
            for round_ in range(args.rounds):
                for name, checkout in systems.items():
                    run = scratch / f"run_{round_}_{len(results[name]['import'])}_{checkout.name}"
                    train = [sys.executable, "-m", "megamix", "train", "--config", "configs/llama_tiny.yaml",
                             "--set", f"data.path={scratch / 'corpus'}", "--set", "data.valid_path=null",
                             "--set", "data.seq_len=64", "--set", "model.vocab_size=512",
                             "--set", f"train.output_dir={run}", "--set", "train.log_interval=1",
                             "--set", "train.progress_bar=false", "--set", "train.tensorboard=false",
                             "--set", "data.split=90,10"]
                    results[name]["import"].append(
                        timed([sys.executable, "-c", "import megamix.train.trainer"], checkout))
                    results[name]["first step"].append(timed(train, checkout, until="step      1 |"))
                    results[name]["plan 7b"].append(
                        timed([sys.executable, "-m", "megamix", "plan", "--config", "configs/llama_7b.yaml"], checkout))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)
    print(f"median of {args.rounds} interleaved rounds, seconds (python {sys.version.split()[0]})\n")
    print("| system | import the trainer | launch → first step (tiny) | `megamix plan` 7b |")
    print("|---|---|---|---|")
    for name, numbers in results.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(v):.2f}" for v in numbers.values()) + " |")


if __name__ == "__main__":
    main()
