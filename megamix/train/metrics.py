"""What a run reports: ``metrics.jsonl`` and TensorBoard (and, through :attr:`MetricsLogger.sinks`,
Weights & Biases: :mod:`megamix.train.loggers`), and the numbers behind them (model FLOPs per token,
MFU; per-layer gradient norms come from :mod:`megamix.parallel.grad_norm`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s of common training GPUs, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int, embedding_params: int) -> float:
    """Training FLOPs per token: 6·N for the matmuls (embedding lookup excluded) plus the
    attention scores and values, 6·2·L·h·s (forward + backward, causal mask not discounted)."""
    return 6.0 * (num_params - embedding_params) + 12.0 * num_layers * hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def tensorboard_tag(key: str) -> str:
    """``loss`` → ``train/loss``, ``val_loss`` → ``eval/val_loss``, ``grad_norm/layer_03`` as is."""
    if "/" in key:
        return key
    return ("eval/" if key.startswith("val_") else "train/") + key


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers by TensorBoard tag; an event line (``{"event": ..., "value": ...}``) is
    one scalar, ``events/<event>/<series>``."""
    if "event" in record:
        tag = f"events/{record['event']}" + (f"/{record['series']}" if "series" in record else "")
        value = record.get("value", 1.0)
        return {tag: value} if isinstance(value, (int, float)) else {}
    return {tensorboard_tag(key): value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float))}


class MetricsLogger:
    """Appends JSON lines to ``metrics.jsonl`` and scalars to TensorBoard (rank 0 only)."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        self.sinks: list = []  # more loggers: objects with log(step, scalars) and close()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop lines a crashed run wrote after the checkpoint we resume from."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        values = scalars(record)
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, record["step"])
        for sink in self.sinks:
            sink.log(record["step"], values)

    def close(self) -> None:
        if not self.enabled or self.file.closed:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        for sink in self.sinks:
            sink.close()
