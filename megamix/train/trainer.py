"""The training loop: data → forward/backward over micro-batches → clip → AdamW step → log,
evaluate and checkpoint, with automatic resume from the latest complete checkpoint.

One process runs the plain model.  Under ``torchrun`` the same loop runs on this rank's share of
the model (``megamix.parallel``): a pipeline schedule replaces the micro-batch loop when ``pp`` > 1,
the loss is computed on vocab-sharded logits when ``tp`` > 1, and FSDP2 reduces gradients over
``dp``.  The global batch of step k holds the same samples on every layout, and the loss, gradient
norms and clipping are reduced over the whole world, so every layout follows the single-process
loss curve.  With ``parallel.engine: deepspeed`` (data parallelism only) a DeepSpeed ZeRO engine
holds the plain model instead of FSDP2 (``megamix.parallel.deepspeed_engine``); the loop reaches
it through a few hook points (``sync_gradients``, ``model_forward``, ``backward``,
``optimizer_step``, ``save``).
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor.parallel import loss_parallel
from tqdm import tqdm

from megamix.config import Config, validate
from megamix.data.gpt_dataset import build_dataset, micro_batches
from megamix.evaluate import evaluate_loss
from megamix.model import Transformer, num_parameters
from megamix.model.placement import describe_placements, layer_placements
from megamix.ops import load_kernels
from megamix.parallel.data_parallel import reshard, set_gradient_sync
from megamix.parallel.grad_norm import clip_gradients, grad_norms
from megamix.parallel.mesh import ParallelMesh, check_layout
from megamix.parallel.parallelize import build_model_parts
from megamix.parallel.pipeline import build_schedule
from megamix.parallel.tensor_parallel import reduce_sequence_parallel_grads, vocab_parallel_cross_entropy
from megamix.train.checkpoint import (
    PendingCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from megamix.train.metrics import MetricsLogger, flops_per_token, peak_flops
from megamix.train.optim import build_optimizer, lr_at
from megamix.train.preemption import EXIT_PREEMPTED, Heartbeat, Preempted, StopSignals


def language_model_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``tokens`` holds ``seq_len + 1`` ids per sample."""
    targets = tokens[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Trainer:
    """One training run: the model (whole, or this rank's share), AdamW, the data, and the loop.

    Construction validates the config against the world size, builds the model and optimizer for
    the layout (``parallel.engine``: FSDP2 with TP/PP, or DeepSpeed ZeRO), and resumes from the
    latest complete checkpoint in ``train.output_dir`` if there is one; :meth:`run` trains to
    ``train.steps``, :meth:`train_step` does one optimizer step.
    """

    def __init__(self, cfg: Config, device: torch.device | str | None = None):
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.cfg = check_layout(cfg, world_size)
        validate(cfg, world_size=world_size, for_training=True)
        t, p = cfg.train, cfg.parallel
        self.device = torch.device(device) if device is not None else default_device()
        self.output_dir = Path(t.output_dir)
        self.mesh = ParallelMesh.from_config(cfg, self.device.type) if world_size > 1 else None
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        load_kernels(distributed_barrier=dist.is_initialized())  # fused add+norm: CUDA kernels or torch; logged
        if self.mesh is None or p.engine == "deepspeed":  # DeepSpeed partitions the plain model itself
            torch.manual_seed(t.seed)
            self.model = Transformer(cfg.model, cfg.norm).to(self.device)
            self.stages = [self.model]
            self.num_params = num_parameters(self.model)
        else:
            parts = build_model_parts(cfg, self.mesh, self.device)
            self.model, self.stages, self.num_params = parts.model, parts.stages, parts.num_params
        self.optimizer = build_optimizer(self.model, t)
        self.deepspeed = None  # parallel.engine: deepspeed: the model and AdamW under a DeepSpeed ZeRO engine
        if p.engine == "deepspeed":
            from megamix.parallel.deepspeed_engine import DeepSpeedZero

            self.deepspeed = DeepSpeedZero(cfg, self.model, self.optimizer)
        self.micro_batches_per_step = t.global_batch_size // (t.micro_batch_size * p.dp)
        self.schedule = None
        if p.pp > 1:
            self.schedule = build_schedule(
                p.schedule, self.stages, parts.stage_ids, p.pp * p.virtual_stages, self.micro_batches_per_step,
                self.micro_batch_loss, self.device, self.mesh.pp_group,
            )
            self.first_stage = 0 in parts.stage_ids
            self.last_stage = p.pp * p.virtual_stages - 1 in parts.stage_ids
        self.train_data = build_dataset(
            cfg.data.path, "train", cfg.data.split, cfg.data.seq_len, t.steps * t.global_batch_size, cfg.data.seed
        )
        valid_path = cfg.data.valid_path or cfg.data.path
        self.valid_data = build_dataset(
            valid_path, "valid", cfg.data.split, cfg.data.seq_len, t.eval_steps * t.micro_batch_size,
            cfg.data.seed, use_split=cfg.data.valid_path is None,
        )
        self.step = 0
        self.resumed_from = None
        self.pending_save: PendingCheckpoint | None = None
        latest = latest_checkpoint(self.output_dir)
        if latest is not None:
            if self.deepspeed is not None:
                state = self.deepspeed.load(latest)
            else:
                state = load_checkpoint(latest, self.model, self.optimizer)
            self.step = state["step"]
            set_rng_state(state["rng"])
            self.resumed_from = latest
        if self.is_main:
            cfg.save(self.output_dir / "config.yaml")
        self.metrics = MetricsLogger(
            self.output_dir, enabled=self.is_main, tensorboard=t.tensorboard,
            resume_step=self.step,  # drop lines a killed run logged after the checkpoint we start from
        )
        embedding = cfg.model.vocab_size * cfg.model.hidden_size
        self.flops_per_token = flops_per_token(
            self.num_params, cfg.model.num_layers, cfg.model.hidden_size, cfg.data.seq_len, embedding
        )

    # ------------------------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_context(self):
        """Forward and backward of the vocab-parallel loss run under torch's ``loss_parallel``."""
        return loss_parallel() if self.cfg.parallel.tp > 1 else contextlib.nullcontext()

    def micro_batch_loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of one micro-batch (``output``: logits, vocab-sharded under TP)."""
        if self.cfg.parallel.tp > 1:
            return vocab_parallel_cross_entropy(output, targets, self.mesh.tp_mesh)
        return F.cross_entropy(output.float().flatten(0, 1), targets.flatten())

    def batch(self, dataset, indices: list[int]) -> torch.Tensor:
        return torch.stack([dataset[i] for i in indices]).to(self.device, non_blocking=True)

    def data_rank(self) -> tuple[int, int]:
        return (self.mesh.dp_rank, self.mesh.dp) if self.mesh else (0, 1)

    def train_step(self) -> dict:
        """One optimizer step over the global batch of ``self.step``."""
        t = self.cfg.train
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for stage in self.stages:
            stage.train()
        indices = micro_batches(self.step, t.global_batch_size, t.micro_batch_size, *self.data_rank())
        if self.schedule is not None:
            loss = self.pipeline_forward_backward(indices)
        else:
            loss = self.forward_backward(indices)
        if self.mesh is not None and self.cfg.parallel.sequence_parallel and self.mesh.tp > 1:
            reduce_sequence_parallel_grads(list(self.model.parameters()), self.mesh.tp_mesh)
        grad_norm, layer_norms = self.optimizer_step()
        self.step += 1
        record = {"step": self.step, "loss": self.global_loss(loss), "lr": lr, "grad_norm": grad_norm}
        if self.should_log(self.step):
            record.update({f"grad_norm/layer_{i:02d}": v for i, v in sorted(layer_norms.items())})
        return record

    def optimizer_step(self) -> tuple[float, dict[int, float]]:
        """Clip and step; returns the global and per-layer gradient norms before clipping (per layer
        only on steps that log them when DeepSpeed holds the gradients, which costs collectives)."""
        t = self.cfg.train
        if self.deepspeed is not None:
            layer_norms = {}
            if self.should_log(self.step + 1):
                layer_norms = self.deepspeed.layer_grad_norms(self.cfg.model.num_layers, self.device)
            return self.deepspeed.step(), layer_norms
        grad_norm, layer_norms = grad_norms(self.model, self.cfg.model.num_layers, self.mesh)
        if t.grad_clip > 0:
            clip_gradients(self.model, grad_norm, t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, layer_norms

    def forward_backward(self, indices: list[list[int]]) -> torch.Tensor:
        """Gradient accumulation over this rank's micro-batches; returns their mean loss."""
        total = torch.zeros((), device=self.device)
        for k, micro in enumerate(indices):
            self.sync_gradients(k == len(indices) - 1)  # reduce over dp once per step
            tokens = self.batch(self.train_data, micro)
            with self.loss_context():
                with self.autocast():
                    logits = self.model_forward(tokens[:, :-1])
                loss = self.micro_batch_loss(logits, tokens[:, 1:]) / len(indices)
                self.backward(loss)
            total += loss.detach()
        return total

    # The ZeRO engine's hook points: FSDP2 works inside the model's own modules, DeepSpeed drives
    # the model through its engine.
    def sync_gradients(self, enabled: bool) -> None:
        """Reduce gradients over dp on the next backward (the step's last), or only accumulate them."""
        if self.deepspeed is not None:
            self.deepspeed.set_gradient_sync(enabled)
        else:
            set_gradient_sync(self.stages, enabled)

    def model_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.deepspeed.forward(inputs) if self.deepspeed is not None else self.model(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed is not None:
            self.deepspeed.backward(loss)
        else:
            loss.backward()

    def pipeline_forward_backward(self, indices: list[list[int]]) -> torch.Tensor | None:
        """One schedule step over all micro-batches; the mean loss on the last stage, else None."""
        tokens = self.batch(self.train_data, [i for micro in indices for i in micro])
        args = (tokens[:, :-1],) if self.first_stage else ()
        targets = tokens[:, 1:] if self.last_stage else None
        losses: list[torch.Tensor] = []
        with self.loss_context(), self.autocast():
            self.schedule.step(*args, target=targets, losses=losses)
        return torch.stack(losses).mean().detach() if self.last_stage else None

    def global_loss(self, loss: torch.Tensor | None) -> float:
        """The batch's mean loss, from the ranks that computed it (every last-stage rank, once per
        data-parallel replica), summed over the world."""
        if self.mesh is None:
            return float(loss)
        counted = loss is not None and self.mesh.tp_rank == 0
        value = torch.zeros((), dtype=torch.float64, device=self.device)
        if counted:
            value += loss.double() / self.mesh.dp
        dist.all_reduce(value)
        return float(value)

    # ------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        t = self.cfg.train
        if self.mesh is None:
            result = evaluate_loss(
                self.model, self.valid_data, t.micro_batch_size, t.eval_steps, self.device, self.autocast()
            )
            return {"step": self.step, **result}
        return {"step": self.step, **self.parallel_evaluate()}

    @torch.no_grad()
    def parallel_evaluate(self) -> dict:
        """Token-weighted validation loss over the same batches :func:`evaluate_loss` reads, the
        batches dealt round-robin over the data-parallel ranks."""
        t = self.cfg.train
        for stage in self.stages:
            stage.eval()
        num_batches = min(len(self.valid_data) // t.micro_batch_size, t.eval_steps)
        dp_rank, dp = self.data_rank()
        size = t.micro_batch_size
        mine = [list(range(b * size, (b + 1) * size)) for b in range(dp_rank, num_batches, dp)]
        if self.schedule is not None:
            losses = self.pipeline_eval(mine)
        else:
            losses = self.plain_eval(mine, rounds=math.ceil(num_batches / dp))
        tokens_per_batch = t.micro_batch_size * self.cfg.data.seq_len
        counted = losses is not None and self.mesh.tp_rank == 0
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        if counted:
            sums[0] = sum(float(v) for v in losses) * tokens_per_batch
            sums[1] = len(losses) * tokens_per_batch
        dist.all_reduce(sums)
        reshard(self.stages)
        for stage in self.stages:
            stage.train()
        loss = float(sums[0] / sums[1].clamp(min=1))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(sums[1])}

    def plain_eval(self, batches: list[list[int]], rounds: int) -> list[torch.Tensor]:
        """The losses of ``batches``, in ``rounds`` forwards: sharded parameters are gathered
        collectively (ZeRO-3), so every rank runs as many forwards as the rank with the most batches,
        a rank with fewer repeating one and dropping its loss."""
        losses = []
        spare = batches[0] if batches else list(range(self.cfg.train.micro_batch_size))
        for r in range(rounds):
            tokens = self.batch(self.valid_data, batches[r] if r < len(batches) else spare)
            with self.loss_context(), self.autocast():
                loss = self.micro_batch_loss(self.model(tokens[:, :-1]), tokens[:, 1:])
            if r < len(batches):
                losses.append(loss)
        return losses

    def pipeline_eval(self, batches: list[list[int]]) -> list[torch.Tensor] | None:
        """Forward-only schedule runs; the last round is padded to the schedule's micro-batch count
        with repeats whose losses are dropped."""
        n = self.micro_batches_per_step
        rounds = max(1, math.ceil(len(batches) / n)) if batches else 0
        # Every pipeline rank must run the same number of rounds: agree on the most any dp rank has.
        count = torch.tensor([rounds], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        losses: list[torch.Tensor] = []
        for r in range(int(count)):
            chunk = batches[r * n:(r + 1) * n]
            real = len(chunk)
            padded = chunk + [batches[0] if batches else list(range(self.cfg.train.micro_batch_size))] * (n - real)
            tokens = self.batch(self.valid_data, [i for micro in padded for i in micro])
            args = (tokens[:, :-1],) if self.first_stage else ()
            targets = tokens[:, 1:] if self.last_stage else None
            round_losses: list[torch.Tensor] = []
            with self.loss_context(), self.autocast():
                self.schedule.eval(*args, target=targets, losses=round_losses)
            losses += round_losses[:real]
        return losses if self.last_stage else None

    # ------------------------------------------------------------------------------------------
    def save(self) -> Path | PendingCheckpoint:
        t = self.cfg.train
        self.wait_for_save()
        consumed = self.step * t.global_batch_size
        if self.deepspeed is not None:  # DeepSpeed's format; written synchronously
            return self.deepspeed.save(self.output_dir, self.step, {"step": self.step, "consumed_samples": consumed},
                                       extra_files={"config.yaml": self.cfg.to_yaml()})
        result = save_checkpoint(
            self.output_dir, self.step, self.model, self.optimizer, {"step": self.step, "consumed_samples": consumed},
            extra_files={"config.yaml": self.cfg.to_yaml()}, async_save=t.async_save,
        )
        if isinstance(result, PendingCheckpoint):
            self.pending_save = result
        return result

    def wait_for_save(self) -> Path | None:
        """Commit an asynchronous save still in flight."""
        if self.pending_save is None:
            return None
        path, self.pending_save = self.pending_save.wait(), None
        return path

    def should_log(self, step: int) -> bool:
        return step % self.cfg.train.log_interval == 0 or step == self.cfg.train.steps

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message, file=sys.stderr)

    # ------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Train to ``train.steps``; returns the training records (one per logged step)."""
        t = self.cfg.train
        tokens_per_step = t.global_batch_size * self.cfg.data.seq_len
        if self.resumed_from:
            self.log(f"resumed from {self.resumed_from} at step {self.step}")
        layout = f", layout {self.mesh}" if self.mesh else ""
        self.log(
            f"megamix: {self.num_params / 1e6:.1f}M params, {self.cfg.model.num_layers} layers "
            f"({describe_placements(layer_placements(self.cfg.norm, self.cfg.model.num_layers))}), "
            f"device {self.device}{layout}, {t.steps} steps × {tokens_per_step} tokens"
        )
        peak = peak_flops(self.device)
        history = []
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress_bar and self.is_main), desc="train",
                   mininterval=1.0, file=sys.stderr)
        window_start, window_steps = time.perf_counter(), 0
        stop = StopSignals.install()  # SIGUSR1/SIGTERM: checkpoint at the next step boundary, then exit
        heartbeat = Heartbeat(t.log_interval, self.step)  # per-rank step times; names the rank if it fails
        while self.step < t.steps:
            record = self.train_step()
            heartbeat.beat(self.step)
            window_steps += 1
            bar.update(1)
            if self.should_log(self.step):
                elapsed = time.perf_counter() - window_start
                record["tokens_per_s"] = window_steps * tokens_per_step / elapsed
                record["steps_per_s"] = window_steps / elapsed
                record["consumed_samples"] = self.step * t.global_batch_size
                if peak:
                    world = self.mesh.world_size if self.mesh else 1
                    record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (peak * world)
                record["peak_mem_gb"] = self.peak_memory_gb()
                self.metrics.log(record)
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                self.log(
                    f"step {self.step:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                    f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s"
                )
                window_start, window_steps = time.perf_counter(), 0
            if t.eval_interval and self.step % t.eval_interval == 0 or self.step == t.steps:
                ev = self.evaluate()
                self.metrics.log(ev)
                self.log(f"step {self.step:>6} | val loss {ev['val_loss']:.4f} | val ppl {ev['val_ppl']:.2f}")
            saved = t.save_interval and self.step % t.save_interval == 0 or self.step == t.steps
            if saved:
                self.save()
            # A stop signal (on any rank: a collective, so every rank asks at every step) ends the run
            # with this step's checkpoint, for the launcher to requeue; after the last step it is moot.
            if self.step < t.steps and stop.requested():
                if not saved:
                    self.save()
                self.wait_for_save()
                self.metrics.close()
                self.log(f"step {self.step:>6} | {stop.reason}: checkpoint saved, exiting with {EXIT_PREEMPTED}")
                stop.release()
                raise Preempted(self.step)
        heartbeat.close()
        stop.uninstall()
        self.wait_for_save()
        bar.close()
        self.metrics.close()
        return history

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB
