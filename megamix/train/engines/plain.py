"""One process, or data and tensor parallelism without a pipeline: the model (whole, or this rank's
FSDP2/DTensor share of it) runs each micro-batch forward and backward, accumulating gradients;
FSDP2 reduces them over ``dp`` on the step's last micro-batch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megamix.checkpoint import PendingCheckpoint
from megamix.config import Config
from megamix.model import Transformer, lm_loss, num_parameters
from megamix.parallel.grad_norm import clip_gradients, copies_per_element, grad_norms
from megamix.train.engines.base import Engine, StepStats, forward_rounds, sum_over_world
from megamix.train.optim import build_optimizer

# FSDP2, DTensor and DCP are imported where a parallel run or a checkpoint needs them: one process
# starts without them.


class PlainEngine(Engine):
    """The model and torch AdamW, on one process or sharded by FSDP2 and DTensor over a mesh."""

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.mesh = None
        if world_size > 1:
            from megamix.parallel.mesh import ParallelMesh

            self.mesh = ParallelMesh.from_config(cfg, device.type)
        if self.mesh is None:
            from megamix.parallel.activation_checkpoint import apply_activation_checkpoint
            from megamix.parallel.precision import apply_precision

            torch.manual_seed(cfg.train.seed)
            self.model = apply_precision(Transformer(cfg.model, cfg.norm), cfg.train.precision).to(device)
            self.stages, self.stage_ids = [self.model], [0]
            self.num_params = num_parameters(self.model)
            apply_activation_checkpoint(self.model, cfg.parallel.activation_checkpoint)  # then compile, as parallelize
            if cfg.train.compile:
                from megamix.parallel.compile import apply_compile

                apply_compile(self.model, cfg.train.compile_backend)
        else:
            from megamix.parallel.parallelize import build_model_parts

            parts = build_model_parts(cfg, self.mesh, device)
            self.model, self.stages, self.stage_ids, self.num_params = (
                parts.model, parts.stages, parts.stage_ids, parts.num_params)
        self.optimizer = build_optimizer(self.model, cfg.train)

    @property
    def data_rank(self) -> tuple[int, int]:
        return (self.mesh.dp_rank, self.mesh.dp) if self.mesh else (0, 1)

    def describe(self) -> str:
        return str(self.mesh) if self.mesh else ""

    # -- the loss -----------------------------------------------------------------------------
    @property
    def tensor_parallel(self) -> bool:
        return self.mesh is not None and self.mesh.tp > 1

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Forward and backward of the vocab-parallel loss run under torch's ``loss_parallel``."""
        if not self.tensor_parallel:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of one micro-batch (``logits`` vocab-sharded under TP)."""
        if self.tensor_parallel:
            from megamix.parallel.tensor_parallel import vocab_parallel_cross_entropy

            return vocab_parallel_cross_entropy(logits, targets, self.mesh.tp_mesh)
        return lm_loss(logits, targets)

    def log_z_squared(self, logits: torch.Tensor) -> torch.Tensor:
        if self.tensor_parallel:
            from megamix.parallel.tensor_parallel import vocab_parallel_log_z_squared

            return vocab_parallel_log_z_squared(logits, self.mesh.tp_mesh)
        return super().log_z_squared(logits)

    # -- one step -----------------------------------------------------------------------------
    def train(self) -> None:
        for stage in self.stages:
            stage.train()

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor | None:
        """Gradient accumulation over this rank's micro-batches; returns their mean loss."""
        self.train()
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        z_total = torch.zeros((), device=self.device) if self.cfg.train.z_loss else None
        for k, tokens in enumerate(micro_batches):
            self.set_gradient_sync(k == n - 1)  # reduce over dp once per step
            with self.loss_context():
                with self.autocast():
                    logits = self.model(tokens[:, :-1])
                objective, ce, z = self.objective(logits, tokens[:, 1:])
                (objective / n).backward()
            total += ce.detach() / n
            if z is not None:
                z_total += z.detach() / n
        self.last_z_loss = z_total
        self.finish_gradients()
        return total

    def set_gradient_sync(self, enabled: bool) -> None:
        if self.mesh is not None:
            from megamix.parallel.data_parallel import set_gradient_sync

            set_gradient_sync(self.stages, enabled)

    def reshard(self) -> None:
        """Free parameters FSDP2 gathered for an evaluation forward."""
        if self.mesh is not None:
            from megamix.parallel.data_parallel import reshard

            reshard(self.stages)

    def finish_gradients(self) -> None:
        """Under sequence parallelism the norms' gradients are partial sums over each tensor rank's
        tokens: add them up."""
        if self.tensor_parallel and self.cfg.parallel.sequence_parallel:
            from megamix.parallel.tensor_parallel import reduce_sequence_parallel_grads

            reduce_sequence_parallel_grads(list(self.model.parameters()), self.mesh.tp_mesh)

    def optimizer_step(self, lr: float, layer_norms: bool = True) -> StepStats:
        self.run_before_optimizer_step()
        grad_norm, per_layer = grad_norms(self.model, self.cfg.model.num_layers, self.mesh)  # one pass for both
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            if self.cfg.train.grad_clip > 0:
                clip_gradients(self.model, grad_norm, self.cfg.train.grad_clip)
            self.set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.run_after_optimizer_step(StepStats(grad_norm, per_layer, skipped))

    def reduce_loss(self, loss: torch.Tensor | None) -> float:
        """The batch's mean loss, from the ranks that computed it (every last-stage rank, once per
        data-parallel replica), summed over the world."""
        if self.mesh is None:
            return float(loss)
        value = torch.zeros((), dtype=torch.float64, device=self.device)
        if loss is not None and self.mesh.tp_rank == 0:
            value += loss.double() / self.mesh.dp
        dist.all_reduce(value)
        return float(value)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def eval_losses(self, batches: Sequence[torch.Tensor]) -> tuple[float, int]:
        for stage in self.stages:
            stage.eval()

        def loss_of(tokens: torch.Tensor) -> torch.Tensor:
            with self.loss_context(), self.autocast():
                return self.loss(self.model(tokens[:, :-1]), tokens[:, 1:])

        shape = (self.cfg.train.micro_batch_size, self.cfg.data.seq_len + 1)
        losses = forward_rounds(batches, loss_of, shape, self.device, collective=self.mesh is not None)
        self.reshard()
        tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
        total = sum(float(loss) * b.shape[0] * (b.shape[1] - 1) for loss, b in zip(losses, batches))
        return sum_over_world(total, tokens, self.device, counted=self.mesh is None or self.mesh.tp_rank == 0)

    # -- instruments --------------------------------------------------------------------------
    @property
    def probe_share(self) -> tuple[bool, bool]:
        """Every data-parallel replica runs the same probe, so only data rank 0 counts; within a
        tensor-parallel group the stream is whole on every rank (tensor rank 0 counts) or, under
        sequence parallelism, split over the tokens (every tensor rank adds its slice)."""
        if self.mesh is None:
            return True, False
        split = self.tensor_parallel and self.cfg.parallel.sequence_parallel
        return self.mesh.dp_rank == 0 and (split or self.mesh.tp_rank == 0), split

    @property
    def probe_heads_count(self) -> bool:
        """Tensor ranks hold disjoint heads of the whole sequence (sequence parallelism or not):
        each counts; data-parallel replicas count once."""
        return self.mesh is None or self.mesh.dp_rank == 0

    def parameter_shards(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        from megamix.parallel.grad_norm import _dtensor_type

        dtensor = _dtensor_type() or ()
        for name, param in self.model.named_parameters():
            local = param.to_local() if isinstance(param, dtensor) else param
            yield name, local.detach(), copies_per_element(param, self.mesh)

    @torch.no_grad()
    def forward_only(self, tokens: torch.Tensor) -> None:
        for stage in self.stages:
            stage.eval()
        with self.autocast():
            self.model(tokens)
        self.reshard()

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Each parameter gathered whole over its stage's data and tensor ranks, parameter by
        parameter (never a whole copy of the model on a rank but rank 0's); a pipeline stage that
        rank 0 does not hold sends its parameters to it from its first rank."""
        if self.mesh is None:
            yield from super().full_parameters()
            return
        from megamix.parallel.grad_norm import _dtensor_type

        dtensor = _dtensor_type() or ()
        local = dict(self.model.named_parameters())
        # Which parameters each rank holds, with their whole shapes (the same on a stage's ranks).
        held: list = [None] * dist.get_world_size()
        dist.all_gather_object(held, [(name, tuple(p.shape), p.dtype) for name, p in local.items()])
        rank = dist.get_rank()
        for pp_rank in range(self.mesh.pp):
            sender = int(self.mesh.mesh.mesh[pp_rank, 0, 0])  # the stage's data rank 0, tensor rank 0
            for name, shape, dtype in held[sender]:
                full = None
                if self.mesh.pp_rank == pp_rank:  # a collective over this stage's data and tensor ranks
                    param = local[name]
                    full = (param.full_tensor() if isinstance(param, dtensor) else param).detach()
                if sender == 0:
                    yield name, full if rank == 0 else None
                elif rank == sender:
                    dist.send(full.contiguous(), dst=0)
                elif rank == 0:
                    buffer = torch.empty(shape, dtype=dtype, device=self.device)
                    dist.recv(buffer, src=sender)
                    yield name, buffer
        dist.barrier()

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, output_dir: Path, step: int, train_state: dict, extra_files: dict[str, str],
             retention: Callable[[Path], None] | None = None) -> Path | PendingCheckpoint:
        from megamix.checkpoint.dcp import save_checkpoint

        return save_checkpoint(output_dir, step, self.model, self.optimizer, train_state, extra_files,
                               async_save=self.cfg.train.async_save, retention=retention)

    def load(self, path: Path) -> dict:
        from megamix.checkpoint.dcp import load_checkpoint

        return load_checkpoint(path, self.model, self.optimizer)
