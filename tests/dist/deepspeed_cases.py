"""Train DeepSpeed ZeRO cases in one ``torchrun`` world, for ``tests/test_deepspeed.py``.

Usage: ``torchrun --nproc-per-node N tests/dist/deepspeed_cases.py SPEC_JSON OUT_DIR``.  ``SPEC_JSON``
is a list of cases, run one after another on the same process group; each case is a dict with

- ``name``, ``overrides`` (``section.key=value`` strings for :func:`megamix.config.load_config`);
- ``steps``: that many ``Trainer.train_step`` calls, then ``Trainer.evaluate`` (and ``Trainer.save``
  with ``save``); or ``run``: ``Trainer.run()``, the whole loop with its checkpoints;
- ``signal_at``: with ``run``, every rank sends itself SIGUSR1 after that step, as Slurm warns a
  job before its time limit: the loop checkpoints the step and raises ``Preempted``.

Rank 0 writes ``OUT/{name}.json``: ``{"records": [...], "eval": {...}, "resumed_at": step,
"preempted_at": step}``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from megamix.config import load_config
from megamix.parallel.mesh import init_distributed
from megamix.train.preemption import Preempted
from megamix.train.trainer import Trainer


def run_case(spec: dict, out: Path) -> None:
    trainer = Trainer(load_config(None, spec["overrides"]))
    result: dict = {"resumed_at": trainer.step}
    if spec.get("run"):
        if spec.get("signal_at"):
            step_once = trainer.train_step

            def train_step() -> dict:
                record = step_once()
                if trainer.step == spec["signal_at"]:
                    os.kill(os.getpid(), signal.SIGUSR1)
                return record

            trainer.train_step = train_step
        try:
            result["records"] = trainer.run()
        except Preempted as stopped:
            result["preempted_at"] = stopped.step
    else:
        result["records"] = [trainer.train_step() for _ in range(spec["steps"])]
        result["eval"] = trainer.evaluate()
        if spec.get("save"):
            trainer.save()
    if dist.get_rank() == 0:
        (out / f"{spec['name']}.json").write_text(json.dumps(result))
    dist.barrier()


def main() -> None:
    spec_file, out = Path(sys.argv[1]), Path(sys.argv[2])
    init_distributed()
    for spec in json.loads(spec_file.read_text()):
        run_case(spec, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
