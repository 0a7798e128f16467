"""Loss-spike and instability flags: a logged event when the loss, the global gradient norm or one
layer's gradient norm jumps beyond its running statistics (``train.spikes``).

Each series keeps the log of its last ``window`` values.  Once it has seen ``warmup`` of them, a
value is flagged when its log exceeds their mean by more than ``sigmas`` standard deviations *and*
by at least log(1 + ``min_rise``): in the log, a jump is measured relative to the series' level (a
loss of 2 jumping to 3 counts as much as a gradient norm of 0.2 jumping to 0.3), and the second
condition keeps a near-constant series from flagging noise.  Flagged values enter the window too, so
a lasting change of level stops being flagged after a while.  Non-finite values are the trainer's
business (``train.nonfinite``) and are neither flagged nor recorded here.

The statistics start afresh after a resume (the first ``warmup`` steps of a resumed run cannot flag).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from megamix.config import SpikeConfig


@dataclass
class Spike:
    step: int
    series: str  # "loss", "grad_norm" or "grad_norm/layer_03"
    value: float
    mean: float  # the running geometric mean
    limit: float  # the value above which it is flagged

    @property
    def event(self) -> str:
        return "loss_spike" if self.series == "loss" else "grad_norm_spike"

    def record(self) -> dict:
        """Its ``metrics.jsonl`` line (no ``loss`` key: readers take lines with one for training lines)."""
        return {"step": self.step, "event": self.event, "series": self.series, "value": self.value,
                "running_mean": self.mean, "limit": self.limit}


class RunningLog:
    """The log of a series' last ``window`` positive values."""

    def __init__(self, window: int):
        self.values: deque[float] = deque(maxlen=window)

    def limit(self, sigmas: float, min_rise: float) -> tuple[float, float]:
        """``(geometric mean, flag limit)`` of the values so far."""
        n = len(self.values)
        mean = sum(self.values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / (n - 1)) if n > 1 else 0.0
        return math.exp(mean), math.exp(mean + max(sigmas * std, math.log1p(min_rise)))

    def add(self, value: float) -> None:
        self.values.append(math.log(value))


class SpikeMonitor:
    """Watches every step's loss and gradient norms; :meth:`observe` returns the step's spikes."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.series: dict[str, RunningLog] = {}

    def observe(self, step: int, loss: float, grad_norm: float, layer_norms: dict[int, float]) -> list[Spike]:
        if not self.cfg.enabled:
            return []
        values = {"loss": loss, "grad_norm": grad_norm}
        if self.cfg.layers:
            values.update({f"grad_norm/layer_{i:02d}": v for i, v in sorted(layer_norms.items())})
        spikes = []
        for name, value in values.items():
            if not (math.isfinite(value) and value > 0):
                continue
            history = self.series.setdefault(name, RunningLog(self.cfg.window))
            if len(history.values) >= self.cfg.warmup:
                mean, limit = history.limit(self.cfg.sigmas, self.cfg.min_rise)
                if value > limit:
                    spikes.append(Spike(step, name, value, mean, limit))
            history.add(value)
        return spikes


def describe(spikes: list[Spike]) -> str:
    """One log line for a step's spikes: ``loss spike 9.1 (limit 4.4); gradient norm spike in layers 2, 3``."""
    parts = []
    for spike in spikes:
        if spike.series in ("loss", "grad_norm"):
            what = "loss" if spike.series == "loss" else "gradient norm"
            parts.append(f"{what} spike {spike.value:.4g} (running mean {spike.mean:.4g}, limit {spike.limit:.4g})")
    layers = [int(s.series.rsplit("_", 1)[1]) for s in spikes if s.series.startswith("grad_norm/layer_")]
    if layers:
        parts.append("gradient norm spike in layer" + ("s " if len(layers) > 1 else " ") + ", ".join(map(str, layers)))
    return "; ".join(parts)
