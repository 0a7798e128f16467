"""Where checkpoints live and what they are: names, format detection, the training state and config.

``checkpoints/step_NNNNNNN`` is complete once it holds ``train_state.json`` beside its weights:
``.metadata`` (DCP) or a ``deepspeed/`` directory.  Only the commit (:mod:`megamix.checkpoint.commit`)
gives a directory that name, so a half-written checkpoint is never mistaken for one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from megamix.config import Config, ConfigError, load_config, validate
from megamix.errors import MegamixError

STEP_DIR = re.compile(r"^step_(\d{7,})$")
TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"
DEEPSPEED_TAG = "deepspeed"  # the sub-directory DeepSpeed writes a checkpoint into (its "tag")


class CheckpointError(MegamixError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or unsafe to read."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_format(path: str | os.PathLike) -> str | None:
    """``"dcp"`` or ``"deepspeed"`` for a complete checkpoint, else None."""
    path = Path(path)
    if not (path / TRAIN_STATE).is_file():
        return None
    if (path / ".metadata").is_file():
        return "dcp"
    if (path / DEEPSPEED_TAG).is_dir():
        return "deepspeed"
    return None


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete ``checkpoints/step_*`` directory, in step order."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and checkpoint_format(child) is not None:
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The highest-numbered complete checkpoint of a run directory, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory given either itself or a run directory (then its latest one)."""
    path = Path(path)
    if checkpoint_format(path) is not None:
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a complete checkpoint nor a run directory with one")
    return latest


def read_train_state(path: str | os.PathLike) -> dict:
    file = Path(path) / TRAIN_STATE
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable training state ({e})") from None


def checkpoint_config(checkpoint: str | os.PathLike) -> Config:
    """The validated config saved in a checkpoint directory (every checkpoint carries its own)."""
    config_file = Path(checkpoint) / CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{checkpoint}: no {CONFIG} beside the checkpoint")
    try:
        return validate(load_config(config_file))
    except ConfigError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
