"""Engines: one per way of running a training step (see :mod:`megamix.train.engines.base`)."""

from __future__ import annotations

import torch

from megamix.config import Config
from megamix.train.engines.base import Engine, StepStats


def build_engine(cfg: Config, device: torch.device) -> Engine:
    """The engine for ``cfg``'s layout: DeepSpeed for ``parallel.engine: deepspeed``, the pipeline
    engine for ``pp > 1``, the plain engine otherwise.  Called on every rank, after the process
    group (if any) exists."""
    if cfg.parallel.engine == "deepspeed":
        from megamix.train.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, device)
    if cfg.parallel.pp > 1:
        from megamix.train.engines.pipeline import PipelineEngine

        return PipelineEngine(cfg, device)
    from megamix.train.engines.plain import PlainEngine

    return PlainEngine(cfg, device)


__all__ = ["Engine", "StepStats", "build_engine"]
