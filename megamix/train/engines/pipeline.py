"""Pipeline parallelism: a ``torch.distributed.pipelining`` schedule runs the step's micro-batches
through this rank's stages (1F1B, GPipe, interleaved 1F1B, zero bubble); everything else —
optimizer, gradient norms, checkpoints, FSDP2 and tensor parallelism within a stage — is the
plain engine's."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from megamix.config import Config
from megamix.parallel.pipeline import build_schedule
from megamix.parallel.stages import stage_to_rank
from megamix.train.engines.base import sum_over_world
from megamix.train.engines.plain import PlainEngine


class PipelineEngine(PlainEngine):
    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        p = cfg.parallel
        num_stages = p.pp * p.virtual_stages
        self.schedule = build_schedule(p.schedule, self.stages, self.stage_ids, num_stages,
                                       self.micro_batches_per_step, self.schedule_loss, device, self.mesh.pp_group)
        self.first_stage = 0 in self.stage_ids
        self.last_stage = num_stages - 1 in self.stage_ids

    def describe(self) -> str:
        p = self.cfg.parallel
        return f"{self.mesh}, {p.schedule} schedule over {p.pp * p.virtual_stages} stages"

    def run_schedule(self, micro_batches: list[torch.Tensor], train: bool) -> list[torch.Tensor]:
        """One pass of the schedule over the micro-batches; their losses on the last stage."""
        tokens = torch.cat(micro_batches)
        # Contiguous: a stage checks its input's strides against the shapes it was built for
        # (torch 2.11's pipelining rejects the (seq + 1)-strided view).
        args = (tokens[:, :-1].contiguous(),) if self.first_stage else ()
        targets = tokens[:, 1:].contiguous() if self.last_stage else None
        losses: list[torch.Tensor] = []
        with self.loss_context(), self.autocast():
            (self.schedule.step if train else self.schedule.eval)(*args, target=targets, losses=losses)
        return losses

    def schedule_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function on the last stage: in a training step the objective, whose
        cross-entropy and z-loss term it records by the objective's identity (the schedule also
        calls it on placeholder tensors to infer shapes; only the losses it returns are counted);
        in evaluation the cross-entropy."""
        if self.step_losses is None:
            return self.loss(logits, targets)
        objective, ce, z = self.objective(logits, targets)
        self.step_losses[id(objective)] = (ce.detach().clone(), None if z is None else z.detach().clone())
        return objective

    step_losses: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None  # during a training step

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor | None:
        """One schedule step over all micro-batches; the mean loss on the last stage, else None.
        (The schedule divides each micro-batch's gradient by their number.)"""
        self.train()
        self.step_losses, self.last_z_loss = {}, None
        try:
            losses = self.run_schedule(micro_batches, train=True)
            parts = [self.step_losses[id(loss)] for loss in losses]
        finally:
            self.step_losses = None
        self.finish_gradients()
        if not self.last_stage:
            return None
        if self.cfg.train.z_loss:
            self.last_z_loss = torch.stack([z for _, z in parts]).mean()
        return torch.stack([ce for ce, _ in parts]).mean()

    @torch.no_grad()
    def forward_only(self, tokens: torch.Tensor) -> None:
        """One batch through the stages in order, outside the schedule (which runs as many
        micro-batches as a step has): each stage receives the residual stream from the rank
        holding the stage before it and sends its own on; the last stage's logits are dropped."""
        p = self.cfg.parallel
        num_stages = p.pp * p.virtual_stages
        group = self.mesh.pp_group
        tp_split = self.tensor_parallel and p.sequence_parallel
        seq = tokens.shape[1] // self.mesh.tp if tp_split else tokens.shape[1]
        for stage, s in zip(self.stages, self.stage_ids):
            stage.eval()
            if s == 0:
                x = tokens
            else:
                x = torch.empty((tokens.shape[0], seq, self.cfg.model.hidden_size), dtype=stage.stream_dtype,
                                device=self.device)
                torch.distributed.recv(x, src=torch.distributed.get_global_rank(group, stage_to_rank(s - 1, p.pp)),
                                       group=group)
            with self.autocast():
                out = stage(x)
            if s < num_stages - 1:
                torch.distributed.send(out.contiguous(),
                                       dst=torch.distributed.get_global_rank(group, stage_to_rank(s + 1, p.pp)),
                                       group=group)
        self.reshard()

    @torch.no_grad()
    def eval_losses(self, batches: Sequence[torch.Tensor]) -> tuple[float, int]:
        """Forward-only schedule runs of as many batches as a training step has micro-batches; the
        last round is padded with repeats whose losses are dropped.  Every pipeline rank runs the
        same number of rounds: the most any data rank needs."""
        for stage in self.stages:
            stage.eval()
        n = self.micro_batches_per_step
        count = torch.tensor([math.ceil(len(batches) / n)], device=self.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        spare = batches[0] if len(batches) else torch.zeros(
            (self.cfg.train.micro_batch_size, self.cfg.data.seq_len + 1), dtype=torch.long, device=self.device)
        total, tokens = 0.0, 0
        for r in range(int(count)):
            chunk = [batches[i] for i in range(r * n, min((r + 1) * n, len(batches)))]
            losses = self.run_schedule(chunk + [spare] * (n - len(chunk)), train=False)
            for loss, b in zip(losses, chunk):
                total += float(loss) * b.shape[0] * (b.shape[1] - 1)
                tokens += b.shape[0] * (b.shape[1] - 1)
        self.reshard()
        counted = self.last_stage and self.mesh.tp_rank == 0
        return sum_over_world(total, tokens, self.device, counted)
