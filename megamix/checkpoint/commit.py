"""The commit protocol every checkpoint format shares, and retention.

Every rank writes its files into ``checkpoints/.tmp_step_NNNNNNN``; once all have (a barrier),
rank 0 adds ``train_state.json`` and the extra files (``config.yaml``) and renames the directory to
``step_NNNNNNN`` — the one moment the checkpoint becomes visible to resume.  A crash before that
leaves only a ``.tmp_`` directory, which resume ignores and the next save of that step replaces.

Deleting is made as safe as writing: a checkpoint to remove (an older one pruned by retention, or
the previous copy of a step saved again) is first renamed out of resume's sight (``.trash_``), then
deleted, so a kill in the middle never leaves a half-deleted directory under a checkpoint's name.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from megamix.checkpoint.files import TRAIN_STATE, complete_checkpoints, step_dir_name

TRASH_PREFIX = ".trash_"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class PendingCheckpoint:
    """An asynchronous save in flight; :meth:`wait` commits it (on every rank, collectively)."""

    def __init__(self, future, commit: Callable[[], Path]):
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


def _to_trash(path: Path) -> Path:
    """Rename a checkpoint directory out of resume's sight; returns its new name."""
    trash = path.with_name(TRASH_PREFIX + path.name)
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    return trash


def discard(path: Path) -> None:
    """Delete a checkpoint directory so that no kill leaves part of it under its name."""
    shutil.rmtree(_to_trash(path))


def commit_checkpoint(tmp: Path, train_state: dict, extra_files: dict[str, str] | None = None,
                      retention: Callable[[Path], None] | None = None) -> Path:
    """Once every rank has written its files into ``tmp``: add the training state and
    ``extra_files``, rename ``tmp`` to ``step_NNNNNNN``, then apply ``retention`` (rank 0, with the
    new checkpoint committed); a collective."""
    final = tmp.with_name(tmp.name.removeprefix(".tmp_"))
    if _rank() == 0:
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    _barrier()
    if _rank() == 0:
        previous = _to_trash(final) if final.exists() else None  # a re-save of the same step
        os.replace(tmp, final)
        if previous is not None:
            shutil.rmtree(previous)
        if retention is not None:
            retention(final)
    _barrier()
    return final


def clear_leftovers(output_dir: str | os.PathLike) -> None:
    """Remove what a killed save or prune left (``.tmp_``/``.trash_`` directories); rank 0 only."""
    root = Path(output_dir) / "checkpoints"
    if _rank() != 0 or not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith((".tmp_", TRASH_PREFIX, ".old_")) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def checkpoints_to_prune(steps: list[int], keep_last: int, keep_every: int, protected: set[int]) -> list[int]:
    """Which of ``steps`` (committed checkpoints) retention removes: all but the ``keep_last`` most
    recent (0: keep all), those at multiples of ``keep_every`` (0: none permanent), and
    ``protected`` ones (the checkpoint the run resumed from)."""
    if keep_last <= 0:
        return []
    recent = set(sorted(steps)[-keep_last:])
    return [s for s in sorted(steps)
            if s not in recent and s not in protected and not (keep_every and s % keep_every == 0)]


def prune(output_dir: str | os.PathLike, keep_last: int, keep_every: int = 0,
          protected: set[int] = frozenset()) -> list[int]:
    """Delete the checkpoints retention does not keep (see :func:`checkpoints_to_prune`); returns their steps."""
    found = dict(complete_checkpoints(output_dir))
    doomed = checkpoints_to_prune(list(found), keep_last, keep_every, set(protected))
    for step in doomed:
        discard(found[step])
    return doomed
