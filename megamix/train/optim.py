"""AdamW and the learning-rate schedules: linear warmup, then cosine decay to ``min_lr``, a constant
rate, or warmup-stable-decay (``wsd``: constant, then a decay to ``min_lr`` over the last
``decay_steps``, linear or 1 − √progress)."""

from __future__ import annotations

import math

import torch

from megamix.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not norms, biases), fused kernels on CUDA.

    Adam's moments take the parameters' dtype: fp32, or bf16 under ``precision: bf16_pure``.  There
    the update runs as the reference code's ``torch.optim.Adam`` on its bf16 model does, with
    torch's default (foreach) implementation, each step of the update rounded to bf16, rather
    than the fused kernel, which keeps the intermediates in fp32."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    fused = on_cuda and cfg.precision != "bf16_pure"
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=fused or None
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimizer step ``step`` (0-based); a pure function of the step, so
    the schedule needs no state of its own to resume."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":
        decay_steps = wsd_decay_steps(cfg)
        start = cfg.steps - decay_steps
        if step < start:
            return cfg.lr
        progress = min(1.0, (step - start) / decay_steps)
        fraction = 1.0 - progress if cfg.decay_shape == "linear" else 1.0 - math.sqrt(progress)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * fraction
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def wsd_decay_steps(cfg: TrainConfig) -> int:
    """The length of warmup-stable-decay's decay: ``decay_steps``, or the last 20% of the run (at
    least one step, never into the warmup)."""
    if cfg.decay_steps is not None:
        return cfg.decay_steps
    return max(1, min(round(0.2 * cfg.steps), cfg.steps - cfg.warmup_steps))
