"""Reading DeepSpeed's checkpoint format (``parallel.engine: deepspeed``) without running code.

DeepSpeed saves with ``torch.save`` and reads its own files with ``torch.load(weights_only=False)``.
:func:`weights_only_loading` makes every ``torch.load`` DeepSpeed calls, for resume
(``engine.load_checkpoint``) or for export (its ``zero_to_fp32``), unpickle with
``weights_only=True`` and an allow-list of DeepSpeed's own small records, so a pickle planted in a
checkpoint on a shared filesystem is refused instead of run.

DeepSpeed is optional (``pip install -e .[deepspeed]``); it is imported only when a DeepSpeed
checkpoint is read.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from megamix.checkpoint.files import DEEPSPEED_TAG, CheckpointError

# What DeepSpeed's checkpoint pickles may name besides tensors, containers and plain values: its
# own small records (the loss scaler, the ZeRO stage enum, fragment addresses; DeepSpeed 0.19).
_SAFE_DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),  # DeepSpeed's fp16 section
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def import_deepspeed():
    """``deepspeed``, or an ImportError that says how to get it."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"DeepSpeed checkpoints need DeepSpeed: pip install -e .[deepspeed] ({e})") from e
    return deepspeed


def _safe_globals() -> list:
    found = []
    for module, name in _SAFE_DEEPSPEED_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return found


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Within this block every ``torch.load`` is ``weights_only=True`` with DeepSpeed's records
    allowed; an unpickling refusal becomes a :class:`CheckpointError` naming the global."""
    original = torch.load

    def load(f, *args, weights_only=None, **kwargs):
        with torch.serialization.safe_globals(_safe_globals()):
            return original(f, *args, weights_only=True, **kwargs)

    torch.load = load
    try:
        yield
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(f"the DeepSpeed checkpoint refers to {found.group(1) if found else 'an object'}, "
                              "which is neither a tensor nor one of DeepSpeed's records; not unpickled") from None
    finally:
        torch.load = original


def read_full_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from a DeepSpeed checkpoint ``step_NNNNNNN`` directory.

    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` reassembles the fp32 master partitions
    of every rank (ZeRO-1, 2 or 3); the optimizer files hold the master weights beside Adam's
    moments, which are loaded (memory-mapped) and dropped.
    """
    import_deepspeed()
    from deepspeed.utils import zero_to_fp32

    path = Path(path)
    try:
        with weights_only_loading():
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read the DeepSpeed checkpoint ({type(e).__name__}: {e})") from None
    return {name: tensor.float() for name, tensor in state.items()}
