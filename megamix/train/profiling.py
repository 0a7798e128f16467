"""``train.profile: {start, steps}``: a ``torch.profiler`` trace of a few training steps and, on CUDA,
a memory snapshot, written per rank into ``OUTPUT_DIR/profile/``:

- ``rank<R>_steps_<A>-<B>.pt.trace.json``: the Chrome/Perfetto trace of steps A…B (CPU ops, CUDA
  kernels, collectives), one ``ProfilerStep#N`` span per step.  Open it at https://ui.perfetto.dev
  (or ``chrome://tracing``); TensorBoard's profiler plugin (``pip install torch-tb-profiler``) reads
  the directory: ``tensorboard --logdir OUTPUT_DIR/profile``.
- ``rank<R>_steps_<A>-<B>.memory.pickle`` (CUDA, ``train.profile.memory``): every allocation with
  its stack over those steps; drag it onto https://pytorch.org/memory_viz.

One step before ``start`` runs under the profiler as warm-up (its numbers are dropped), as
torch.profiler's schedule recommends.  The profiler only observes: the steps compute what they
would without it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megamix.config import ProfileConfig


class StepProfiler:
    """Call :meth:`before_step` and :meth:`after_step` around every training step (numbered as in
    the logs, from 1); :meth:`close` when the run ends (also early)."""

    def __init__(self, cfg: ProfileConfig, output_dir: Path, device: torch.device, rank: int, log):
        self.cfg, self.device, self.rank, self.log = cfg, device, rank, log
        self.dir = output_dir / "profile"
        self.first, self.last = cfg.start, cfg.start + cfg.steps - 1
        self.warmup = 1 if cfg.start > 1 else 0
        self.profiler = None
        self.memory = cfg.memory and device.type == "cuda"

    @property
    def enabled(self) -> bool:
        return self.cfg.steps > 0

    def before_step(self, step: int) -> None:
        if not self.enabled or self.profiler is not None or step != self.first - self.warmup:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.profiler = profile(
            activities=activities, schedule=schedule(wait=0, warmup=self.warmup, active=self.cfg.steps, repeat=1),
            on_trace_ready=self._write_trace, record_shapes=self.cfg.record_shapes, with_stack=self.cfg.with_stack,
            profile_memory=self.memory,
        )
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self.profiler.start()

    def after_step(self, step: int) -> None:
        if self.profiler is None:
            return
        self.profiler.step()
        if step >= self.last:
            self.close()

    def _write_trace(self, prof) -> None:
        path = self.dir / f"rank{self.rank}_steps_{self.first}-{self.last}.pt.trace.json"
        prof.export_chrome_trace(str(path))
        if self.rank == 0:
            self.log(f"profile: trace of steps {self.first}-{self.last} in {path} (open it at https://ui.perfetto.dev)")

    def close(self) -> None:
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        if self.memory:
            path = self.dir / f"rank{self.rank}_steps_{self.first}-{self.last}.memory.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            if self.rank == 0:
                self.log(f"profile: memory snapshot in {path} (open it at https://pytorch.org/memory_viz)")
