"""The DeepSpeed engine (``parallel.engine: deepspeed``): ZeRO-1 and offload.

FSDP2 is the default engine because it composes with our tensor and pipeline parallelism.  DeepSpeed
brings what FSDP2 lacks: ZeRO-1 (only the optimizer states sharded, parameters and gradients whole
on every rank) and ZeRO-Offload/Infinity (optimizer states, and under ZeRO-3 the parameters, kept
in host memory or on NVMe between steps).  It shards plain parameters over data-parallel ranks
only, so it runs data-parallel layouts (``tp = pp = 1``; :func:`megamix.config.validate` says so
up front).

What is ours and what is DeepSpeed's:

- The model is the plain :class:`~megamix.model.Transformer`, built from ``train.seed`` on every
  rank exactly as one process builds it, and the optimizer is our torch AdamW with its two weight
  decay groups; DeepSpeed partitions both (``deepspeed.initialize``).  Passing a torch optimizer
  also spares building DeepSpeed's CPU Adam extension; with offload, the same AdamW steps the
  fp32 states in host memory.
- The learning rate is still set by the trainer on every step (``lr_at``); DeepSpeed gets no
  scheduler.  Batch sizes are derived from ``train.*`` (:func:`deepspeed_config`); users add other
  DeepSpeed keys under ``parallel.deepspeed``, merged last.
- Mixed precision stays the trainer's: fp32 parameters with ``torch.autocast`` under ``bf16``,
  as in one process and under FSDP2, so all engines compute the same numbers.  (DeepSpeed's own
  ``bf16`` section, which keeps bf16 parameters, can be switched on under ``parallel.deepspeed``.)
- Checkpoints are DeepSpeed's own format (each rank writes its optimizer partition), under our
  ``checkpoints/step_NNNNNNN`` naming, committed atomically like DCP checkpoints, with our
  ``train_state.json`` and ``config.yaml`` beside them (:meth:`DeepSpeedEngine.save`).  They resume
  on the same number of data-parallel ranks, read with ``weights_only`` unpickling
  (:mod:`megamix.checkpoint.deepspeed`), which also assembles the fp32 weights of any ZeRO stage for
  ``megamix.load_model`` and the Hugging Face exporter.

DeepSpeed is optional (``pip install -e .[deepspeed]``): it is imported only here, and only when a
run or a checkpoint needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megamix.checkpoint import CheckpointError, begin_checkpoint, commit_checkpoint, read_train_state, rng_state
from megamix.checkpoint.deepspeed import import_deepspeed, weights_only_loading
from megamix.checkpoint.files import DEEPSPEED_TAG, checkpoint_format
from megamix.config import Config
from megamix.model import Transformer, lm_loss, num_parameters
from megamix.parallel.activation_checkpoint import apply_activation_checkpoint
from megamix.parallel.grad_norm import layer_grad_norms
from megamix.train.engines.base import Engine, StepStats, forward_rounds, sum_over_world
from megamix.train.optim import build_optimizer


def _merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, recursively for nested sections (``zero_optimization`` etc.)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed config of a run, generated from ours, with ``parallel.deepspeed`` merged last."""
    p, t = cfg.parallel, cfg.train
    dp = p.dp or 1
    zero: dict[str, Any] = {"stage": p.zero}
    if p.offload != "none":
        target = {"device": p.offload}
        if p.offload == "nvme":
            target["nvme_path"] = p.offload_path
        zero["offload_optimizer"] = dict(target)
        if p.zero == 3:  # ZeRO-3 also keeps its parameter partitions there between uses
            zero["offload_param"] = dict(target)
    generated = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # Our torch AdamW, also with offload, where it steps the host-resident fp32 states
        # (DeepSpeed's CPU Adam is faster there but is a C++ build, and would replace our optimizer).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
    }
    return _merge(generated, p.deepspeed or {})


def _ensure_process_group() -> None:
    """DeepSpeed needs a process group even in one process (ZeRO-Offload on one GPU): a world of
    one, described in the environment as a launcher would (DeepSpeed reads ``LOCAL_RANK``)."""
    if dist.is_initialized():
        return
    for name in ("LOCAL_RANK", "RANK"):
        os.environ.setdefault(name, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedEngine(Engine):
    """The plain model and its torch AdamW under a DeepSpeed ZeRO engine, every data rank holding
    the whole model's computation (``tp = pp = 1``)."""

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        deepspeed = import_deepspeed()
        _ensure_process_group()
        torch.manual_seed(cfg.train.seed)
        model = Transformer(cfg.model, cfg.norm).to(device)
        self.num_params = num_parameters(model)
        apply_activation_checkpoint(model, cfg.parallel.activation_checkpoint)
        self.optimizer = build_optimizer(model, cfg.train)  # DeepSpeed partitions its states; lr is set on it
        self.config = deepspeed_config(cfg)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.config)
        self.model = self.engine.module

    @property
    def data_rank(self) -> tuple[int, int]:
        return dist.get_rank(), dist.get_world_size()

    def describe(self) -> str:
        p = self.cfg.parallel
        offload = f", offload {p.offload}" if p.offload != "none" else ""
        return f"DeepSpeed ZeRO-{p.zero} over {dist.get_world_size()} ranks{offload}"

    # -- one step -----------------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Our loop, not DeepSpeed's counter, marks the step's last micro-batch as the accumulation
        boundary, where gradients are reduced; the loss is already divided by the micro-batch count."""
        self.engine.train()
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        z_total = torch.zeros((), device=self.device) if self.cfg.train.z_loss else None
        for k, tokens in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(k == n - 1)
            with self.autocast():
                logits = self.engine(tokens[:, :-1])
            objective, ce, z = self.objective(logits, tokens[:, 1:])
            self.engine.backward(objective / n, scale_wrt_gas=False)
            total += ce.detach() / n
            if z is not None:
                z_total += z.detach() / n
        self.last_z_loss = z_total
        return total

    def optimizer_step(self, lr: float, layer_norms: bool = True) -> StepStats:
        """DeepSpeed clips (``gradient_clipping``) and steps; the global norm is its own, known only
        after the update, so a non-finite step is applied (and the trainer stops: ``train.nonfinite:
        skip`` is refused for this engine).  Per-layer norms cost collectives here, so they are
        computed only when asked."""
        self.run_before_optimizer_step()
        per_layer = self.layer_grad_norms() if layer_norms else {}
        self.set_lr(self.optimizer, lr)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return self.run_after_optimizer_step(StepStats(float(norm) if norm is not None else float("nan"), per_layer))

    def layer_grad_norms(self) -> dict[int, float]:
        """The norm of each layer's reduced gradient (a collective: every rank calls it).

        Under ZeRO-3 each rank squares its own partition of every gradient and one all-reduce adds
        them; under ZeRO-1/2 DeepSpeed assembles each full gradient on every rank (one all-reduce
        per parameter), so each rank counts 1/world of it.
        """
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        world = dist.get_world_size()
        zero3 = self.cfg.parallel.zero == 3

        def grads():
            for name, param in self.model.named_parameters():
                grad = safe_get_local_grad(param) if zero3 else safe_get_full_grad(param)
                if grad is not None:
                    yield name, grad.to(self.device), 1 if zero3 else world

        return layer_grad_norms(grads(), self.cfg.model.num_layers, reduce=True, device=self.device)[1]

    def reduce_loss(self, loss: torch.Tensor | None) -> float:
        value = loss.detach().double().reshape(1) / dist.get_world_size()
        dist.all_reduce(value)
        return float(value)

    # -- instruments --------------------------------------------------------------------------
    @property
    def probe_share(self) -> tuple[bool, bool]:
        return dist.get_rank() == 0, False  # every rank runs the same probe on the whole model

    @property
    def probe_heads_count(self) -> bool:
        return dist.get_rank() == 0

    def parameter_shards(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        """Under ZeRO-3 each rank's fp32 partition of every parameter; under ZeRO-1/2 the whole
        parameter, which every rank holds."""
        zero3 = self.cfg.parallel.zero == 3
        world = dist.get_world_size()
        for name, param in self.model.named_parameters():
            if zero3:
                from deepspeed.utils import safe_get_local_fp32_param

                yield name, safe_get_local_fp32_param(param).detach(), 1
            else:
                yield name, param.detach(), world

    @torch.no_grad()
    def forward_only(self, tokens: torch.Tensor) -> None:
        self.engine.eval()
        with self.autocast():
            self.engine(tokens)

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Under ZeRO-3 each parameter is gathered (a collective) for the moment it is read."""
        if self.cfg.parallel.zero != 3:
            yield from super().full_parameters()
            return
        deepspeed = import_deepspeed()
        rank0 = dist.get_rank() == 0
        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.detach().clone() if rank0 else None

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def eval_losses(self, batches: Sequence[torch.Tensor]) -> tuple[float, int]:
        self.engine.eval()

        def loss_of(tokens: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return lm_loss(self.engine(tokens[:, :-1]), tokens[:, 1:])

        shape = (self.cfg.train.micro_batch_size, self.cfg.data.seq_len + 1)
        losses = forward_rounds(batches, loss_of, shape, self.device, collective=True)
        tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
        total = sum(float(loss) * b.shape[0] * (b.shape[1] - 1) for loss, b in zip(losses, batches))
        return sum_over_world(total, tokens, self.device)

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, output_dir: Path, step: int, train_state: dict, extra_files: dict[str, str],
             retention: Callable[[Path], None] | None = None) -> Path:
        """Write ``checkpoints/step_NNNNNNN`` in DeepSpeed's format, committed atomically.

        Every rank writes its partitions into ``.tmp_step_NNNNNNN/deepspeed/`` (DeepSpeed also
        writes its ``latest`` file and ``zero_to_fp32.py`` there); rank 0 adds the training state
        and ``extra_files`` and, once all ranks are done, renames the directory into place.
        """
        tmp = begin_checkpoint(output_dir, step)
        self.engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG)
        return commit_checkpoint(tmp, dict(train_state, rng=rng_state()), extra_files, retention)

    def load(self, path: Path) -> dict:
        """Resume from a DeepSpeed checkpoint of this run: model, optimizer partitions, training
        state.  Every ``torch.load`` DeepSpeed makes is ``weights_only``: a checkpoint directory on a
        shared filesystem is not trusted as code is."""
        path = Path(path)
        if checkpoint_format(path) != "deepspeed":
            raise CheckpointError(f"{path}: not a DeepSpeed checkpoint (written by parallel.engine: fsdp2?); "
                                  "resume it with the engine that wrote it")
        saved_by = len(list((path / DEEPSPEED_TAG).glob("*_optim_states.pt")))
        world = dist.get_world_size()
        if saved_by != world:
            raise CheckpointError(f"{path}: saved by {saved_by} data-parallel ranks; DeepSpeed resumes its "
                                  f"optimizer partitions on as many ranks (this run has {world})")
        try:
            with weights_only_loading():
                loaded, _ = self.engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load the checkpoint")
        return read_train_state(path)
