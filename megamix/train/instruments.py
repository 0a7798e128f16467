"""The instruments the training loop carries, behind one small interface: depth statistics
(:mod:`megamix.train.stats`), loss-spike and instability flags (:mod:`megamix.train.monitors`),
Weights & Biases (:mod:`megamix.train.loggers`), the profiler (:mod:`megamix.train.profiling`)
and downstream evals (:mod:`megamix.train.downstream`).

The trainer calls :meth:`Instruments.before_step` and :meth:`Instruments.watch` inside a training
step, :meth:`Instruments.after_step` once the step's logging and evaluation are done, and
:meth:`Instruments.close` when the run ends.  Each instrument is off unless configured (the spike
flags, which cost nothing, are on by default); none changes what a step computes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from megamix.config import Config
from megamix.schemes import describe_schemes, layer_schemes
from megamix.train.data import RunData
from megamix.train.engines import Engine, StepStats
from megamix.train.metrics import MetricsLogger
from megamix.train.monitors import SpikeMonitor, describe
from megamix.train.profiling import StepProfiler


def due(interval: int, step: int, last: int) -> bool:
    """Whether an every-``interval``-steps instrument runs at ``step`` (also at the last step)."""
    return bool(interval) and (step % interval == 0 or step == last)


class Instruments:
    def __init__(self, cfg: Config, engine: Engine, data: RunData, metrics: MetricsLogger, output_dir: Path,
                 device: torch.device, log: Callable[[str], None]):
        t = cfg.train
        self.cfg, self.engine, self.metrics, self.log = cfg, engine, metrics, log
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.stats = None
        if t.stats_interval:
            from megamix.train.stats import DepthStats

            self.stats = DepthStats(engine, cfg.model.num_layers, data.probe(t.stats_probe_sequences, device))
        self.spikes = SpikeMonitor(t.spikes)
        self.profiler = StepProfiler(t.profile, output_dir, device, rank, log)
        self.downstream = None
        if t.downstream_interval:
            from megamix.train.downstream import DownstreamEvals

            self.downstream = DownstreamEvals(cfg, engine, device)
        if t.wandb.mode != "disabled" and metrics.enabled:
            from megamix.train.loggers import WandbLogger

            metrics.sinks.append(WandbLogger(cfg, output_dir, self.placement()))

    def placement(self) -> dict:
        """What W&B gets beside the config: each layer's scheme, the layout, the size."""
        schemes = layer_schemes(self.cfg.norm, self.cfg.model.num_layers)
        return {"layer_schemes": schemes, "summary": describe_schemes(schemes),
                "layout": self.engine.describe() or "one process", "num_params": self.engine.num_params,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1}

    # -- inside a step ------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        """Before step ``step`` (numbered from 1) computes anything."""
        self.profiler.before_step(step)
        if self.stats is not None and due(self.cfg.train.stats_interval, step, self.cfg.train.steps):
            self.stats.arm()

    def watch(self, record: dict, stats: StepStats) -> None:
        """A finished step's loss and gradient norms: log an event for each spike."""
        spikes = self.spikes.observe(record["step"], record["loss"], record["grad_norm"], stats.layer_norms)
        for spike in spikes:
            self.metrics.log(spike.record())
        if spikes:
            self.log(f"step {record['step']:>6} | instability: {describe(spikes)}")

    # -- after a step -------------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        """Depth statistics and downstream evals when due (collectives), then the profiler's step."""
        t = self.cfg.train
        if self.stats is not None and due(t.stats_interval, step, t.steps):
            from megamix.train.stats import summary_line

            values = self.stats.measure()
            self.metrics.log({"step": step, **values})
            self.log(f"step {step:>6} | stats: {summary_line(values, self.cfg.model.num_layers)}")
        if self.downstream is not None and due(t.downstream_interval, step, t.steps):
            record = self.downstream.run(step)
            if record is not None:
                self.metrics.log(record)
                shown = ", ".join(f"{k.removeprefix('downstream/')} {v:.4g}" for k, v in record.items() if k != "step")
                self.log(f"step {step:>6} | downstream: {shown}")
        self.profiler.after_step(step)

    def close(self) -> None:
        self.profiler.close()
