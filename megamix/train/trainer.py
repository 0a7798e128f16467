"""The training loop: which samples each step reads, the learning-rate schedule, when to log,
evaluate and save, preemption, metrics and resume — the same for every way of running.

How a step is computed on this rank's share of the model, for whatever layout the config asks for,
is the engine's business (:mod:`megamix.train.engines`): the loop hands it the step's micro-batches
and the learning rate, and asks it to evaluate, save and load.
The global batch of step k holds the same samples on every layout, and the engines reduce the loss
and gradient norms over the whole world, so every layout follows the single-process loss curve.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megamix.checkpoint import latest_checkpoint, read_train_state, set_rng_state
from megamix.checkpoint.commit import clear_leftovers, prune
from megamix.config import Config, validate
from megamix.errors import MegamixError
from megamix.ops import load_kernels
from megamix.schemes import describe_schemes, layer_schemes
from megamix.train.data import RunData
from megamix.train.engines import build_engine
from megamix.train.instruments import Instruments
from megamix.train.metrics import MetricsLogger, flops_per_token, peak_flops
from megamix.train.optim import lr_at
from megamix.train.preemption import EXIT_PREEMPTED, Heartbeat, Preempted, StopSignals
from megamix.train.resume import RunLock, check_resume_config, check_resume_data


class NonFiniteError(MegamixError, RuntimeError):
    """A step's loss or gradient norm is not finite (``train.nonfinite: stop``)."""


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Trainer:
    """One training run: the engine for the layout, the data, and the loop.

    Construction validates the config against the world size, builds the engine (model and
    optimizer for the layout), and resumes from the latest complete checkpoint in
    ``train.output_dir`` if there is one; :meth:`run` trains to ``train.steps``,
    :meth:`train_step` does one optimizer step.
    """

    def __init__(self, cfg: Config, device: torch.device | str | None = None):
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.cfg = validate(cfg, world_size=world_size, for_training=True)
        t = cfg.train
        self.device = torch.device(device) if device is not None else default_device()
        self.output_dir = Path(t.output_dir)
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        self.lock = RunLock(self.output_dir) if self.is_main else None  # one writer per run directory
        try:
            self.build()
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def build(self) -> None:
        """The engine, the data, the state to resume from, the metrics."""
        cfg, t = self.cfg, self.cfg.train
        load_kernels(distributed_barrier=dist.is_initialized())  # fused add+norm: CUDA kernels or torch; logged
        self.engine = build_engine(cfg, self.device)
        clear_leftovers(self.output_dir)
        latest = latest_checkpoint(self.output_dir)
        state = read_train_state(latest) if latest is not None else {"step": 0, "consumed_samples": 0}
        self.step = state["step"]
        self.consumed_samples = state.get("consumed_samples", self.step * t.global_batch_size)
        # How far the sample order must reach; the order itself does not depend on it.
        self.data = RunData(cfg, self.consumed_samples + (t.steps - self.step) * t.global_batch_size)
        self.loader, self.pending_save, self.resumed_from, self.resumed_step = None, None, None, None
        if latest is not None:
            self.resume(latest, state)
        if self.is_main:
            cfg.save(self.output_dir / "config.yaml")
        self.metrics = MetricsLogger(
            self.output_dir, enabled=self.is_main, tensorboard=t.tensorboard,
            resume_step=self.step,  # drop lines a killed run logged after the checkpoint we start from
        )
        # Depth statistics, spike flags, W&B, the profiler, downstream evals (each off unless configured).
        self.instruments = Instruments(cfg, self.engine, self.data, self.metrics, self.output_dir, self.device,
                                       self.log)
        embedding = cfg.model.vocab_size * cfg.model.hidden_size
        self.flops_per_token = flops_per_token(
            self.engine.num_params, cfg.model.num_layers, cfg.model.hidden_size, cfg.data.seq_len, embedding
        )

    # -- resume -------------------------------------------------------------------------------
    def resume(self, checkpoint: Path, state: dict) -> None:
        """Continue from ``checkpoint``: after checking that its config and data are this run's
        (a named error otherwise), restore the engine's model and optimizer and the RNG."""
        changes = check_resume_config(checkpoint, self.cfg)
        if self.consumed_samples:
            check_resume_data(state.get("data"), self.data.identity(), self.cfg)
        self.engine.load(checkpoint)
        set_rng_state(state["rng"])
        self.resumed_from, self.resumed_step = checkpoint, self.step
        for change in changes:
            self.log(f"resume: {change}")

    # -- one step -----------------------------------------------------------------------------
    def next_batch(self) -> list[torch.Tensor]:
        """This rank's micro-batches of the global batch that starts at the samples consumed so far
        (read ahead by the loader's workers)."""
        if self.loader is None or self.loader.consumed != self.consumed_samples:
            self.close_loader()
            self.loader = self.data.loader(self.consumed_samples, self.engine.data_rank, self.device)
        return self.loader.next_step()

    def close_loader(self) -> None:
        if self.loader is not None:
            self.loader.close()
            self.loader = None

    def train_step(self) -> dict:
        """One optimizer step over the global batch that starts at the samples consumed so far."""
        t = self.cfg.train
        lr = lr_at(self.step, t)
        self.instruments.before_step(self.step + 1)
        loss = self.engine.forward_backward(self.next_batch())
        stats = self.engine.optimizer_step(lr, layer_norms=self.should_log(self.step + 1))
        loss = self.engine.reduce_loss(loss)
        self.step += 1
        self.consumed_samples += t.global_batch_size
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": stats.grad_norm}
        if t.z_loss:  # the auxiliary term, beside the cross-entropy that "loss" stays
            record["z_loss"] = self.engine.reduce_loss(self.engine.last_z_loss)
        if stats.skipped or not (math.isfinite(loss) and math.isfinite(stats.grad_norm)):
            self.nonfinite(record, stats.skipped)
        self.instruments.watch(record, stats)
        if self.should_log(self.step):
            record.update({f"grad_norm/layer_{i:02d}": v for i, v in sorted(stats.layer_norms.items())})
        return record

    def nonfinite(self, record: dict, skipped: bool) -> None:
        """A step whose loss or gradient norm is not finite: under ``train.nonfinite: skip`` the run
        goes on without its update; else it stops here, its last checkpoint the last good state."""
        what = f"step {record['step']}: loss {record['loss']}, gradient norm {record['grad_norm']}"
        if skipped and self.cfg.train.nonfinite == "skip":
            record["skipped"] = True
            self.metrics.log({"step": record["step"], "event": "nonfinite_step_skipped"})
            self.log(f"{what}: not finite, step skipped")
            return
        raise NonFiniteError(f"{what}: not finite; stopping (the last checkpoint in {self.output_dir} is the last "
                             "good state; set train.nonfinite: skip to skip such steps)")

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Validation loss over the first ``train.eval_tokens`` tokens of the validation data, dealt
        round-robin over the data-parallel ranks (the same samples on every layout)."""
        total, tokens = self.engine.eval_losses(self.data.validation(self.engine.data_rank, self.device))
        loss = total / tokens
        return {"step": self.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}

    # -- checkpoints --------------------------------------------------------------------------
    def save(self):
        """Checkpoint this step (committed now, or when the next save or the run's end waits for it
        under ``train.async_save``); older checkpoints are pruned per ``train.keep_last/keep_every``
        once the new one has committed, never the one this run resumed from."""
        self.wait_for_save()
        t = self.cfg.train
        state = {"step": self.step, "consumed_samples": self.consumed_samples, "data": self.data.identity()}
        def retention(committed: Path) -> None:
            protected = {self.resumed_step} if self.resumed_step is not None else set()
            prune(self.output_dir, t.keep_last, t.keep_every, protected=protected)

        result = self.engine.save(self.output_dir, self.step, state, {"config.yaml": self.cfg.to_yaml()}, retention)
        if not isinstance(result, Path):
            self.pending_save = result
        return result

    def wait_for_save(self) -> Path | None:
        """Commit an asynchronous save still in flight."""
        if self.pending_save is None:
            return None
        path, self.pending_save = self.pending_save.wait(), None
        return path

    # -- the loop -----------------------------------------------------------------------------
    def should_log(self, step: int) -> bool:
        return step % self.cfg.train.log_interval == 0 or step == self.cfg.train.steps

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message, file=sys.stderr)

    def run(self) -> list[dict]:
        """Train to ``train.steps``; returns the training records (one per logged step)."""
        t = self.cfg.train
        self.log_start()
        history, meter = [], ThroughputMeter(t.global_batch_size * self.cfg.data.seq_len, self.flops_per_token,
                                             peak_flops(self.device), self.world_size)
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress_bar and self.is_main), desc="train",
                   mininterval=1.0, file=sys.stderr)
        stop = StopSignals.install()  # SIGUSR1/SIGTERM/SIGINT: checkpoint at the next step boundary, then exit
        stop.training_started()
        heartbeat = Heartbeat(t.log_interval, self.step)  # per-rank step times; names the rank if it fails
        try:
            while self.step < t.steps:
                record = self.train_step()
                heartbeat.beat(self.step)
                meter.tick()
                bar.update(1)
                if self.should_log(self.step):
                    record.update(meter.window(), consumed_samples=self.consumed_samples,
                                  peak_mem_gb=self.peak_memory_gb())
                    self.metrics.log(record)
                    history.append(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                    z_loss = f" | z-loss {record['z_loss']:.2e}" if "z_loss" in record else ""
                    self.log(f"step {self.step:>6} | loss {record['loss']:.4f}{z_loss} | lr {record['lr']:.2e} | "
                             f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s")
                if t.eval_interval and self.step % t.eval_interval == 0 or self.step == t.steps:
                    ev = self.evaluate()
                    self.metrics.log(ev)
                    self.log(f"step {self.step:>6} | val loss {ev['val_loss']:.4f} | val ppl {ev['val_ppl']:.2f}")
                self.instruments.after_step(self.step)  # depth statistics, downstream evals, profiler
                saved = t.save_interval and self.step % t.save_interval == 0 or self.step == t.steps
                if saved:
                    self.save()
                # A stop signal on any rank (a collective, so every rank asks at every step) ends the run
                # with this step's checkpoint, for the launcher to requeue; after the last step it is moot.
                if self.step < t.steps and stop.requested():
                    if not saved:
                        self.save()
                    self.wait_for_save()
                    self.log(f"step {self.step:>6} | {stop.reason}: checkpoint saved, exiting with {EXIT_PREEMPTED}")
                    stop.release()
                    raise Preempted(self.step)
            stop.uninstall()
            self.wait_for_save()
        finally:
            self.close_loader()
            self.instruments.close()
            heartbeat.close()
            bar.close()
            self.metrics.close()
            if self.lock is not None:
                self.lock.release()
        return history

    def log_start(self) -> None:
        t = self.cfg.train
        if self.resumed_from:
            self.log(f"resumed from {self.resumed_from} at step {self.step} ({self.consumed_samples:,} samples read)")
        layout = self.engine.describe()
        schemes = describe_schemes(layer_schemes(self.cfg.norm, self.cfg.model.num_layers))
        self.log(f"megamix: {self.engine.num_params / 1e6:.1f}M params, {self.cfg.model.num_layers} layers "
                 f"({schemes}), device {self.device}{', ' + layout if layout else ''}, "
                 f"{t.steps} steps × {t.global_batch_size * self.cfg.data.seq_len} tokens")

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB


class ThroughputMeter:
    """Tokens/s, steps/s and MFU over the steps since the last logged one."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None, world_size: int):
        self.tokens_per_step, self.flops_per_token, self.peak, self.world_size = (
            tokens_per_step, flops_per_token, peak, world_size)
        self.start, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    def window(self) -> dict:
        elapsed = time.perf_counter() - self.start
        out = {"tokens_per_s": self.steps * self.tokens_per_step / elapsed, "steps_per_s": self.steps / elapsed}
        if self.peak:
            out["mfu"] = out["tokens_per_s"] * self.flops_per_token / (self.peak * self.world_size)
        self.start, self.steps = time.perf_counter(), 0
        return out
