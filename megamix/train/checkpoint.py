"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), committed atomically.

A checkpoint is ``OUTPUT_DIR/checkpoints/step_NNNNNNN/`` (N = optimizer steps done) holding DCP's
shards of the model and optimizer plus ``train_state.json`` (step, consumed samples, RNG states).
Everything is written into ``.tmp_step_NNNNNNN`` first and renamed when complete, so a directory
with the final name is always whole; a crash mid-save leaves only a ``.tmp`` directory, which
resume ignores and the next save replaces.

DCP stores tensors by fully-qualified name and slice, so the same checkpoint loads on any
parallel layout.  Loading never unpickles arbitrary objects: DCP's metadata file is read with an
allow-list unpickler (:class:`SafeFileSystemReader`), and the training state is JSON.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from megamix.config import Config, load_config, validate

STEP_DIR = re.compile(r"^step_(\d{7,})$")
TRAIN_STATE = "train_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_format(path: Path) -> str | None:
    """``"dcp"`` or ``"deepspeed"`` (``parallel.engine: deepspeed``, see
    :mod:`megamix.parallel.deepspeed_engine`) for a complete checkpoint, else None."""
    if not (path / TRAIN_STATE).is_file():
        return None
    if (path / ".metadata").is_file():
        return "dcp"
    if (path / "deepspeed").is_dir():
        return "deepspeed"
    return None


def _is_complete(path: Path) -> bool:
    return checkpoint_format(path) is not None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The highest-numbered complete ``checkpoints/step_*`` directory, or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and _is_complete(child):
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def checkpoint_config(checkpoint: str | os.PathLike) -> Config:
    """The validated config saved in a checkpoint directory (every checkpoint carries its own)."""
    config_file = Path(checkpoint) / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{checkpoint}: no config.yaml beside the checkpoint")
    return validate(load_config(config_file))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory given either itself or a run directory (then its latest one)."""
    path = Path(path)
    if _is_complete(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a complete checkpoint nor a run directory with one")
    return latest


# ----------------------------------------------------------------------------------------------
# Safe reading of DCP metadata.

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
        except (pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ----------------------------------------------------------------------------------------------
# RNG state as JSON.


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _decode(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    state = {"torch": _encode(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = _encode(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(state["cuda"]))


# ----------------------------------------------------------------------------------------------
# Save and load.


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_BACKGROUND_GROUP: list = []


def _background_group() -> dist.ProcessGroup | None:
    """A gloo group of all ranks for the background writer, so its collectives never interleave
    with training's on the default group (created once, by every rank at the same save)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if not _BACKGROUND_GROUP:
        _BACKGROUND_GROUP.append(dist.new_group(backend="gloo"))
    return _BACKGROUND_GROUP[0]


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it runs without a process group; in one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter name, so any layout can read any other's:
    the optimizer's state is flattened (``state.layers.3.mlp.up_proj.weight.exp_avg``) rather than
    indexed by position, which differs between pipeline stages."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


class PendingCheckpoint:
    """An asynchronous save in flight; :meth:`wait` commits it (on every rank, collectively)."""

    def __init__(self, future: Any, commit: Any):
        self._future, self._commit = future, commit

    def wait(self) -> Path:
        self._future.result()
        return self._commit()


def begin_checkpoint(output_dir: str | os.PathLike, step: int) -> Path:
    """The empty ``checkpoints/.tmp_step_NNNNNNN`` directory every rank writes ``step``'s files
    into (a leftover from a killed save is cleared first); a collective."""
    tmp = Path(output_dir) / "checkpoints" / f".tmp_{step_dir_name(step)}"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def commit_checkpoint(tmp: Path, train_state: dict, extra_files: dict[str, str] | None = None,
                      keep: int | None = None) -> Path:
    """Once every rank has written its files into ``tmp``: add the training state and
    ``extra_files``, then rename ``tmp`` to ``step_NNNNNNN``, the one moment the checkpoint
    becomes visible to resume; a collective.  Any checkpoint format commits this way."""
    final = tmp.with_name(tmp.name.removeprefix(".tmp_"))
    if _rank() == 0:
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    _barrier()
    if _rank() == 0:
        if final.exists():  # a re-save of the same step: move the old copy out of resume's sight first,
            old = final.with_name(f".old_{final.name}")  # so a kill while deleting never leaves half of it
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        if keep:
            _prune(final.parent, keep)
    _barrier()
    return final


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    train_state: dict,
    keep: int | None = None,
    extra_files: dict[str, str] | None = None,
    async_save: bool = False,
) -> Path | PendingCheckpoint:
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
        return commit_checkpoint(tmp, rank_state, extra_files, keep)

    with _quiet_dcp():
        if async_save:
            future = dcp.async_save(state, checkpoint_id=tmp, process_group=_background_group())
            return PendingCheckpoint(future, commit)
        dcp.save(state, checkpoint_id=tmp)
    return commit()


def _prune(root: Path, keep: int) -> None:
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and _is_complete(p)
    )
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def read_train_state(path: str | os.PathLike) -> dict:
    file = Path(path) / TRAIN_STATE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable training state ({e})") from None


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    strict: bool = True,
) -> dict:
    """Load a checkpoint into ``model`` (and ``optimizer``) in place; returns the training state.

    The model may be laid out differently from the one that saved: DCP reshards on load.
    """
    path = Path(path)
    if not _is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (missing .metadata or {TRAIN_STATE})")
    if checkpoint_format(path) == "deepspeed":
        raise CheckpointError(f"{path}: a DeepSpeed checkpoint; resume it with parallel.engine: deepspeed "
                              "(megamix.load_model and the HF exporter read it too)")
    state = _state(model, optimizer)
    reader = SafeFileSystemReader(path)
    reader.read_metadata()  # a corrupt .metadata fails here with its name, before DCP wraps it
    try:
        with _quiet_dcp():
            dcp.load(state, storage_reader=reader)
    except (Exception, CheckpointException) as e:  # a missing or truncated shard surfaces here
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=strict))
    if optimizer is not None:
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    return read_train_state(path)
