"""``torch.distributed.checkpoint`` (DCP): the format of every FSDP2/TP/PP and one-process run.

DCP stores tensors by fully-qualified name and slice, so a checkpoint saved on one layout loads on
any other.  The optimizer state is saved flattened by parameter name
(``state.layers.3.mlp.up_proj.weight.exp_avg``) rather than by position, which differs between
pipeline stages.

Reading never unpickles an arbitrary object: the ``.metadata`` file goes through an allow-list
unpickler (:class:`SafeFileSystemReader`), tensors through ``torch.load(weights_only=True)`` as DCP
does, and the byte items (the optimizer's plain values: learning rate, betas, flags), which DCP's
default planner would ``torch.load`` with ``weights_only=False``, through
:class:`WeightsOnlyLoadPlanner`.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from megamix.checkpoint.commit import PendingCheckpoint, begin_checkpoint, commit_checkpoint
from megamix.checkpoint.files import CheckpointError, checkpoint_format, read_train_state
from megamix.checkpoint.state import rng_state

_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "Path"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, but the ``.metadata`` pickle may only name DCP's own types."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError, OSError, AttributeError, ImportError) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that byte items are read with ``weights_only=True``:
    plain values and containers load, a pickle that names any other object is refused."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"the checkpoint's value {fqn!r} is not plain data; not unpickled ({e})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it runs without a process group; in one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def safe_load(state: dict, path: str | os.PathLike) -> None:
    """``dcp.load`` of ``state`` in place from ``path``, with the safe reader and planner; a
    missing, truncated or unsafe file is a :class:`CheckpointError` naming the checkpoint."""
    reader = SafeFileSystemReader(path)
    reader.read_metadata()  # a corrupt .metadata fails here with its name, before DCP wraps it
    try:
        with _quiet_dcp():
            dcp.load(state, storage_reader=reader, planner=WeightsOnlyLoadPlanner())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # a missing or truncated shard surfaces here
        inner = _unsafe_value(e)
        if inner is not None:
            raise CheckpointError(f"{path}: {inner}") from None
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None


def _unsafe_value(e: BaseException) -> str | None:
    """The refusal of :class:`WeightsOnlyLoadPlanner`, if DCP wrapped one in its own exception."""
    for failure in getattr(e, "failures", {}).values():
        if isinstance(failure, CheckpointError):
            return str(failure)
        inner = getattr(failure, "exception", None) or getattr(failure, "__cause__", None)
        if isinstance(inner, CheckpointError):
            return str(inner)
    text = str(e)
    return text[text.index("the checkpoint's value"):].splitlines()[0] if "the checkpoint's value" in text else None


def tensor_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``{model tensor name: DCP tensor metadata}`` (size, dtype) of a checkpoint, without reading it."""
    metadata = SafeFileSystemReader(path).read_metadata()
    return {key[len("model."):]: meta for key, meta in metadata.state_dict_metadata.items() if key.startswith("model.")}


def read_tensors(path: str | os.PathLike, entries: list[tuple[str, torch.Size]], dtype: torch.dtype) -> dict:
    """Just these model tensors, whole (DCP reassembles TP/FSDP shards), cast to ``dtype``."""
    state = {"model": {name: torch.empty(shape, dtype=dtype) for name, shape in entries}}
    safe_load(state, path)
    return state["model"]


# ----------------------------------------------------------------------------------------------
# Training state: model and optimizer of this rank, saved and loaded collectively.


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


_BACKGROUND_GROUP: list = []


def _background_group() -> dist.ProcessGroup | None:
    """A gloo group of all ranks for the background writer, so its collectives never interleave
    with training's on the default group (created once, by every rank at the same save)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if not _BACKGROUND_GROUP:
        _BACKGROUND_GROUP.append(dist.new_group(backend="gloo"))
    return _BACKGROUND_GROUP[0]


def save_checkpoint(output_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, train_state: dict,
                    extra_files: dict[str, str] | None = None, async_save: bool = False,
                    retention=None) -> Path | PendingCheckpoint:
    """Save model, optimizer and training state for ``step``; returns the committed directory.

    Every rank of a parallel run calls this: each writes its own shards, rank 0 the training state
    (with its RNG state) and ``extra_files``, and after a barrier rank 0 renames the directory into
    place.  With ``async_save`` the shards are copied to host memory and written by a background
    thread while training goes on; the returned :class:`PendingCheckpoint` commits when waited on.
    """
    tmp = begin_checkpoint(output_dir, step)
    state = _state(model, optimizer)
    rank_state = dict(train_state, rng=rng_state())  # the RNG of this moment, not of the commit

    def commit() -> Path:
        return commit_checkpoint(tmp, rank_state, extra_files, retention)

    with _quiet_dcp():
        if async_save:
            future = dcp.async_save(state, checkpoint_id=tmp, process_group=_background_group())
            return PendingCheckpoint(future, commit)
        dcp.save(state, checkpoint_id=tmp)
    return commit()


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    strict: bool = True) -> dict:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``) in place; returns the training state.
    The model may be laid out differently from the one that saved: DCP reshards on load."""
    path = Path(path)
    fmt = checkpoint_format(path)
    if fmt is None:
        raise CheckpointError(f"{path}: not a complete checkpoint (missing .metadata or train_state.json)")
    if fmt == "deepspeed":
        raise CheckpointError(f"{path}: a DeepSpeed checkpoint; resume it with parallel.engine: deepspeed "
                              "(megamix.load_model and the HF exporter read it too)")
    state = _state(model, optimizer)
    safe_load(state, path)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=strict))
    if optimizer is not None:
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    return read_train_state(path)
