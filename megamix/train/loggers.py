"""Weights & Biases as an optional logger (``pip install megamix[wandb]``, ``train.wandb.mode``).

Rank 0 logs every scalar that goes to ``metrics.jsonl`` and TensorBoard, under the same tags, at the
training step.  The run's W&B id is kept in ``OUTPUT_DIR/wandb_id``: a run resumed in the same
directory (a Slurm requeue, an extended run) continues the same W&B run (``resume="allow"``).
``offline`` needs no network: W&B writes ``OUTPUT_DIR/wandb/offline-run-*-<id>/`` (one per launch,
all with the run's id), which ``wandb sync`` uploads later.  The resolved config and a placement
summary (each layer's scheme, the layout, the parameter count) are attached as the run's config.

W&B is imported only here, and only when ``train.wandb.mode`` is not ``disabled``.
"""

from __future__ import annotations

import os
import re
import secrets
import string
from pathlib import Path

from megamix.config import Config, ConfigError
from megamix.errors import MegamixError

ID_FILE = "wandb_id"
VALID_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what W&B accepts as a run id


def run_id(output_dir: Path) -> str:
    """The run's W&B id: the one in ``OUTPUT_DIR/wandb_id``, or a new one written there."""
    path = output_dir / ID_FILE
    if path.is_file() and path.read_text().strip():
        kept = path.read_text().strip()
        if not VALID_ID.fullmatch(kept):
            raise MegamixError(f"{path}: not a W&B run id ({kept[:40]!r}); delete the file to start a new W&B run")
        return kept
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's own ids
    tmp = path.with_name(ID_FILE + ".tmp")
    tmp.write_text(new + "\n")
    os.replace(tmp, path)
    return new


class WandbLogger:
    """A :class:`~megamix.train.metrics.MetricsLogger` sink: ``log(step, scalars)``, ``close()``."""

    def __init__(self, cfg: Config, output_dir: Path, placement: dict):
        w = cfg.train.wandb
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.wandb.mode", f"{w.mode} needs Weights & Biases: pip install 'megamix[wandb]' "
                              "(or set train.wandb.mode: disabled)") from None
        output_dir.mkdir(parents=True, exist_ok=True)
        self.id = run_id(output_dir)
        self.run = wandb.init(
            project=w.project, entity=w.entity, name=w.name or output_dir.resolve().name, group=w.group,
            tags=w.tags, mode=w.mode, dir=str(output_dir), id=self.id, resume="allow",
            config={**cfg.to_dict(), "placement": placement},
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
