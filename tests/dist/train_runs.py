"""Train several tiny runs one after another in one torchrun world, each to its last step and its
final checkpoint: tests that need checkpoints saved by a parallel layout pay for one launch.

    python -m torch.distributed.run --nproc-per-node 4 tests/dist/train_runs.py RUNS.json

``RUNS.json`` is a list of override lists, one per run (``section.key=value`` strings, as
``megamix train --set`` takes them), each with its own ``train.output_dir``.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from megamix.config import load_config
from megamix.parallel.mesh import init_distributed
from megamix.train.trainer import Trainer


def main() -> None:
    runs = json.loads(Path(sys.argv[1]).read_text())
    init_distributed()
    for overrides in runs:
        Trainer(load_config(None, overrides)).run()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
