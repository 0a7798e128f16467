"""What a run reports: ``metrics.jsonl``, TensorBoard, a console line, and the numbers behind
them (per-layer gradient norms, model FLOPs per token, MFU)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s of common training GPUs, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def layer_grad_norms(model: torch.nn.Module) -> dict[int, float]:
    """sqrt(Σ‖∇W‖²) over each layer's parameters, keyed by global layer index (local gradients:
    parallel code combines the squares across ranks before taking the root)."""
    squares = layer_grad_squares(model)
    return {i: math.sqrt(s) for i, s in squares.items()}


def layer_grad_squares(model: torch.nn.Module) -> dict[int, float]:
    out = {}
    for key, block in model.layers.items():
        total = torch.zeros((), dtype=torch.float64)
        for p in block.parameters():
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                total += torch.linalg.vector_norm(g.detach(), dtype=torch.float32).double().square().cpu()
        out[int(key)] = float(total)
    return out


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
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(tensorboard_tag(key), value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
