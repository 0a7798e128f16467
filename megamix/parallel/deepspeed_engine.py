"""DeepSpeed as the second ZeRO engine (``parallel.engine: deepspeed``): ZeRO-1 and offload.

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
  ``train_state.json`` and ``config.yaml`` beside them (:func:`save_checkpoint`).  They resume on
  the same number of data-parallel ranks; :func:`read_full_state_dict` assembles the fp32 weights
  of any ZeRO stage for ``megamix.load_model`` and the Hugging Face exporter.

DeepSpeed is optional (``pip install -e .[deepspeed]``): it is imported only here, and only when a
run or a checkpoint needs it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megamix.config import Config
from megamix.train.checkpoint import CheckpointError, begin_checkpoint, commit_checkpoint, rng_state

DEEPSPEED_TAG = "deepspeed"  # the sub-directory DeepSpeed writes a checkpoint into (its "tag")


def import_deepspeed() -> types.ModuleType:
    """``deepspeed``, or an ImportError that says how to get it."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"parallel.engine: deepspeed needs DeepSpeed: pip install -e .[deepspeed] ({e})") from e
    return deepspeed


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


class DeepSpeedZero:
    """A plain model and its torch AdamW under a DeepSpeed ZeRO engine.

    The trainer drives it with the same steps as FSDP2: :meth:`set_gradient_sync` before each
    micro-batch (the last one is DeepSpeed's accumulation boundary, where gradients are reduced),
    :meth:`forward` and :meth:`backward` per micro-batch, then :meth:`step`.
    """

    def __init__(self, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer):
        deepspeed = import_deepspeed()
        _ensure_process_group()
        self.cfg = cfg
        self.zero = cfg.parallel.zero
        self.config = deepspeed_config(cfg)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.module: nn.Module = self.engine.module

    # ------------------------------------------------------------------------------------------
    # One optimizer step.

    def set_gradient_sync(self, enabled: bool) -> None:
        """Mark the next backward as the step's last (gradients are reduced and the optimizer
        steps) or not (they accumulate); our loop, not DeepSpeed's counter, decides."""
        self.engine.set_gradient_accumulation_boundary(enabled)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's forward through the engine, which prepares ZeRO's backward hooks."""
        return self.engine(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss the trainer has already divided by the micro-batch count."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Clip (``train.grad_clip``) and step; returns the global gradient norm before clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def layer_grad_norms(self, num_layers: int, device: torch.device) -> dict[int, float]:
        """The norm of each layer's reduced gradient, keyed by layer index; call it between the
        step's last backward and :meth:`step` (a collective: every rank calls it).

        Under ZeRO-3 each rank squares its own partition of every gradient and one all-reduce adds
        them; under ZeRO-1/2 DeepSpeed assembles each full gradient on every rank (one all-reduce
        per parameter), so each rank counts 1/world of it.
        """
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        world = dist.get_world_size()
        squares = torch.zeros(num_layers + 1, dtype=torch.float64, device=device)
        for name, param in self.module.named_parameters():
            if self.zero == 3:
                grad, copies = safe_get_local_grad(param), 1
            else:
                grad, copies = safe_get_full_grad(param), world
            if grad is None:
                continue
            parts = name.split(".")
            slot = int(parts[1]) if parts[0] == "layers" else num_layers  # the last slot: embedding, norm, head
            squares[slot] += grad.detach().to(device).double().pow(2).sum() / copies
        dist.all_reduce(squares)
        values = squares.cpu().tolist()
        return {i: values[i] ** 0.5 for i in range(num_layers)}

    # ------------------------------------------------------------------------------------------
    # Checkpoints.

    def save(self, output_dir: str | os.PathLike, step: int, train_state: dict,
             extra_files: dict[str, str] | None = None) -> Path:
        """Write ``checkpoints/step_NNNNNNN`` in DeepSpeed's format, committed atomically.

        Every rank writes its partitions into ``.tmp_step_NNNNNNN/deepspeed/`` (DeepSpeed also
        writes its ``latest`` file and ``zero_to_fp32.py`` there); rank 0 adds the training state
        and ``extra_files`` and, once all ranks are done, renames the directory into place.
        """
        tmp = begin_checkpoint(output_dir, step)
        self.engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG)
        return commit_checkpoint(tmp, dict(train_state, rng=rng_state()), extra_files)

    def load(self, path: str | os.PathLike) -> dict:
        """Resume from a DeepSpeed checkpoint of this run: model, optimizer partitions, training state.

        DeepSpeed reads its files with ``torch.load(weights_only=False)``; a checkpoint to resume
        from is the run's own output, so it is trusted as the code is.
        """
        from megamix.train.checkpoint import checkpoint_format, read_train_state

        path = Path(path)
        if checkpoint_format(path) != "deepspeed":
            raise CheckpointError(f"{path}: not a DeepSpeed checkpoint (written by parallel.engine: fsdp2?); "
                                  "resume it with the engine that wrote it")
        saved_by = len(list((path / DEEPSPEED_TAG).glob("*_optim_states.pt")))
        world = dist.get_world_size()
        if saved_by != world:
            raise CheckpointError(f"{path}: saved by {saved_by} data-parallel ranks; DeepSpeed resumes its "
                                  f"optimizer partitions on as many ranks (this run has {world})")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load the checkpoint")
        return read_train_state(path)


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint without training: the fp32 weights of any ZeRO stage, in one process.

# What DeepSpeed's checkpoint pickles may name besides tensors, containers and plain values: its
# own small records (the loss scaler, the ZeRO stage enum, fragment addresses; DeepSpeed 0.19).
# Anything else fails to unpickle.
_SAFE_DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),  # DeepSpeed's fp16 section
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _safe_globals() -> list:
    import importlib

    found = []
    for module, name in _SAFE_DEEPSPEED_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return found


class _WeightsOnlyTorch(types.ModuleType):
    """``torch`` as DeepSpeed's ``zero_to_fp32`` sees it while we read a checkpoint: the same module,
    but ``load`` unpickles with ``weights_only=True`` (tensors, containers and the allow-list above)."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(f, *args, weights_only=True, **kwargs)


@contextlib.contextmanager
def _weights_only_loading() -> Iterator[types.ModuleType]:
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _WeightsOnlyTorch()
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.torch = original


def read_full_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from a DeepSpeed checkpoint ``step_NNNNNNN`` directory.

    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` reassembles the fp32 master partitions
    of every rank (ZeRO-1, 2 or 3); its files are read with ``weights_only=True`` and an allow-list
    of DeepSpeed's own record types, so converting a checkpoint never runs code from it.  The
    optimizer files hold the master weights beside Adam's moments, which are loaded (memory-mapped)
    and dropped.
    """
    import_deepspeed()
    path = Path(path)
    try:
        with _weights_only_loading() as zero_to_fp32:
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(f"{path}: the DeepSpeed checkpoint refers to {found.group(1) if found else 'an object'}, "
                              "which is neither a tensor nor one of DeepSpeed's records; not unpickled") from None
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read the DeepSpeed checkpoint ({type(e).__name__}: {e})") from None
    return {name: tensor.float() for name, tensor in state.items()}
