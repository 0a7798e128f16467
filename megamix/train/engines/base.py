"""The engine protocol: what the training loop asks of a way of running the model.

The trainer (:class:`megamix.train.trainer.Trainer`) owns what every run shares — the learning-rate
schedule, which samples a step reads, when to log, evaluate and save, preemption, metrics.  An
engine owns how a step is computed on this rank's share of the model: the forward and backward
over the step's micro-batches, the optimizer step with its gradient norms, the validation loss,
and the checkpoint format.  One engine per way of running:

- :class:`~megamix.train.engines.plain.PlainEngine`: one process, or FSDP2 / tensor parallelism
  without pipelining (gradient accumulation over micro-batches);
- :class:`~megamix.train.engines.pipeline.PipelineEngine`: a ``torch.distributed.pipelining``
  schedule runs the micro-batches through the stages;
- :class:`~megamix.train.engines.deepspeed.DeepSpeedEngine`: DeepSpeed's ZeRO (stages 1–3, offload).

(The shape follows OLMo-core's split between its ``Trainer`` and ``TrainModule``, and Megatron-Core's
choice of a forward-backward function per pipeline layout; the code is ours.)
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megamix.checkpoint import PendingCheckpoint
from megamix.config import Config
from megamix.model import lm_loss, log_z_squared


@dataclass
class StepStats:
    """What an optimizer step reports: the gradient norms before clipping (per layer by global
    index, possibly empty where computing them costs extra), and whether the update was left out
    because the gradients were not finite."""

    grad_norm: float
    layer_norms: dict[int, float] = field(default_factory=dict)
    skipped: bool = False


class Engine(ABC):
    """How this rank runs training steps, evaluation and checkpoints for one layout."""

    model: nn.Module  # this rank's parameters under the single-process model's names
    num_params: int  # of the whole model, all ranks together

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        # Called with the engine once a step's gradients are final (reduced over every rank that
        # shares them), before norms, clipping and the optimizer: tests and instruments read them here.
        self.before_optimizer_step: list[Callable[[Engine], None]] = []
        # Called with the engine and the step's StepStats once the optimizer has updated the weights
        # (the depth statistics' update-to-weight ratios compare them with the weights before).
        self.after_optimizer_step: list[Callable[[Engine, StepStats], None]] = []

    # -- layout -------------------------------------------------------------------------------
    @property
    def data_rank(self) -> tuple[int, int]:
        """``(rank, size)`` of this process among the data-parallel replicas."""
        return 0, 1

    @property
    def micro_batches_per_step(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.data_rank[1])

    def describe(self) -> str:
        """The layout, for the start-of-run log line ("" for one process)."""
        return ""

    # -- the loss -----------------------------------------------------------------------------
    last_z_loss: torch.Tensor | None = None  # this rank's z-loss term of the last step (None: off or not here)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of one micro-batch: what is logged and evaluated."""
        return lm_loss(logits, targets)

    def log_z_squared(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean log²Z of one micro-batch's logits (:func:`megamix.model.loss.log_z_squared`)."""
        return log_z_squared(logits)

    def objective(self, logits: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(what backward runs on, the cross-entropy, the z-loss term)`` of one training
        micro-batch: the cross-entropy, plus ``train.z_loss`` · mean log²Z when that is set."""
        ce = self.loss(logits, targets)
        if not self.cfg.train.z_loss:
            return ce, ce, None
        z = self.cfg.train.z_loss * self.log_z_squared(logits)
        return ce + z, ce, z

    # -- one step -----------------------------------------------------------------------------
    @abstractmethod
    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor | None:
        """Forward and backward over this rank's micro-batches (each ``[micro_batch, seq_len + 1]``
        token ids) of :meth:`objective`, with gradients averaged over the global batch; returns
        this rank's mean cross-entropy (None on ranks that compute no loss, e.g. pipeline stages
        before the last) and leaves its mean z-loss term in ``last_z_loss``."""

    @abstractmethod
    def optimizer_step(self, lr: float, layer_norms: bool = True) -> StepStats:
        """Clip (``train.grad_clip``) and step with learning rate ``lr``; a step whose gradient norm
        is not finite leaves the weights as they are where the engine can tell in time (reported as
        ``skipped``).  ``layer_norms``: whether this step wants per-layer gradient norms (an engine
        where they cost extra collectives may then leave them out)."""

    def reduce_loss(self, loss: torch.Tensor | None) -> float:
        """The global batch's mean loss from this rank's share (a collective in parallel runs)."""
        return float(loss)

    # -- evaluation ---------------------------------------------------------------------------
    @abstractmethod
    def eval_losses(self, batches: Sequence[torch.Tensor]) -> tuple[float, int]:
        """``(sum of token losses, tokens)`` over every data rank's ``batches`` (this rank's share
        of the validation batches, each ``[batch, seq_len + 1]``); identical on every rank."""

    # -- checkpoints --------------------------------------------------------------------------
    @abstractmethod
    def save(self, output_dir: Path, step: int, train_state: dict, extra_files: dict[str, str],
             retention: Callable[[Path], None] | None = None) -> Path | PendingCheckpoint:
        """Write this step's checkpoint (a collective); a pending one commits when waited on."""

    @abstractmethod
    def load(self, path: Path) -> dict:
        """Restore model and optimizer from a checkpoint; returns its training state."""

    # -- shared helpers -----------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run_before_optimizer_step(self) -> None:
        for hook in self.before_optimizer_step:
            hook(self)

    def run_after_optimizer_step(self, stats: StepStats) -> StepStats:
        for hook in self.after_optimizer_step:
            hook(self, stats)
        return stats

    # -- instruments (megamix.train.stats, megamix.train.downstream) --------------------------
    @property
    def probe_share(self) -> tuple[bool, bool]:
        """How this rank's share of a statistic of the residual stream adds up over the world:
        ``(counts, tokens_split)``.  ``tokens_split``: the stream this rank sees is its slice of the
        tokens (sequence parallelism), so the slices' sums add up; ``counts``: this rank's sums
        enter the world's sum (one replica of each share counts, however many ranks hold it)."""
        return True, False

    @property
    def probe_heads_count(self) -> bool:
        """Whether this rank's sums over the attention heads it holds (the norms on q, k and v)
        enter the world's sum: tensor-parallel ranks hold disjoint heads for every token, so each
        counts; replicas of the same heads count once."""
        return True

    def parameter_shards(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        """``(name, this rank's local share of the parameter, on how many ranks each of its
        elements lives)`` for every parameter (the single-process model's names)."""
        for name, param in self.model.named_parameters():
            yield name, param.detach(), 1

    @torch.no_grad()
    def forward_only(self, tokens: torch.Tensor) -> None:
        """The model's forward over ``tokens`` (``[batch, seq]``, the same on every rank), without
        gradients and without touching the training state (a collective: every rank calls it);
        instruments watch it through module hooks.  The output is dropped."""
        self.model.eval()
        with self.autocast():
            self.model(tokens)

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Every parameter of the model, whole, on global rank 0 (``None`` on the other ranks), in
        ``named_parameters`` order (a collective: every rank iterates to the end)."""
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        for name, param in self.model.named_parameters():
            yield name, param.detach() if rank0 else None

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every rank (in place, returned)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
        return values

    def reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        """``values``' elementwise maximum over every rank (in place, returned)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def set_lr(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr


def forward_rounds(batches: Sequence[torch.Tensor], loss_of: Callable[[torch.Tensor], torch.Tensor],
                   spare_shape: tuple[int, int], device: torch.device, collective: bool) -> list[torch.Tensor]:
    """The mean loss of each of ``batches``.  Where parameters are gathered collectively (ZeRO-3),
    every data rank must run as many forwards as the rank with the most batches, so a rank with
    fewer repeats a batch (a zero batch if it has none) and drops its loss."""
    rounds = len(batches)
    if collective:
        count = torch.tensor([rounds], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        rounds = int(count)
    losses = []
    for r in range(rounds):
        if r < len(batches):
            tokens = batches[r]
        else:
            tokens = batches[0] if len(batches) else torch.zeros(spare_shape, dtype=torch.long, device=device)
        loss = loss_of(tokens)
        if r < len(batches):
            losses.append(loss)
    return losses


def sum_over_world(token_losses: float, tokens: int, device: torch.device, counted: bool = True) -> tuple[float, int]:
    """Add ``(loss sum, tokens)`` over every rank (those with ``counted`` False contribute nothing)."""
    if not dist.is_initialized():
        return token_losses, tokens
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    if counted:
        sums[0], sums[1] = token_losses, tokens
    dist.all_reduce(sums)
    return float(sums[0]), int(sums[1])
