"""What makes resuming safe: one writer per run directory, and a checkpoint resumed only by the
config that describes the same model and the same data.

A run directory has one writer: :class:`RunLock` holds an exclusive lock on ``OUTPUT_DIR/.lock``
for the life of the run, so a second ``megamix train`` on the same directory fails at once with a
named error naming the holder (host and pid) instead of racing it and corrupting checkpoints.

Resuming compares the config with the checkpoint's own (:func:`check_resume_config`).  A different
model (any ``model.*`` or ``norm.*`` field) or different data (``data.seq_len``, ``data.seed``, the
corpus, the split) would silently train something else from the checkpoint's weights, so it is a
named error listing the fields.  Everything else may change and is logged: ``train.steps`` (extend
a run), the learning-rate settings, batch sizes (the run continues from the samples consumed),
cadences, the parallel layout (checkpoints reshard).  ``train.accept_changes`` names fields the user
changes on purpose (e.g. ``[data.path]`` after moving the corpus).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from megamix.checkpoint import checkpoint_config, read_train_state
from megamix.config import Config, ConfigError
from megamix.errors import MegamixError

# Fields that define what is being trained; a change is refused unless accepted by name.
IDENTITY_SECTIONS = ("model", "norm")
IDENTITY_DATA_FIELDS = ("path", "valid_path", "seq_len", "split", "seed", "tokenizer")


class ResumeMismatchError(ConfigError):
    """The config differs from the checkpoint's in what defines the model or the data."""


def _flat(cfg: Config) -> dict[str, object]:
    return {f"{section}.{key}": value for section, fields in cfg.to_dict().items() for key, value in fields.items()}


def identity_field(key: str, data_read: bool) -> bool:
    """Whether a change to ``key`` changes what is trained (the data only once some has been read:
    a checkpoint imported from Hugging Face starts on any corpus)."""
    section, _, name = key.partition(".")
    return section in IDENTITY_SECTIONS or (data_read and section == "data" and name in IDENTITY_DATA_FIELDS)


def check_resume_config(checkpoint: str | os.PathLike, cfg: Config) -> list[str]:
    """Compare ``cfg`` with the config saved in ``checkpoint``: raise :class:`ResumeMismatchError`
    for a change to the model's or the data's identity (unless named in ``train.accept_changes``);
    return one line per other changed field, for the log."""
    saved, now = _flat(checkpoint_config(checkpoint)), _flat(cfg)
    data_read = read_train_state(checkpoint).get("consumed_samples", 1) > 0
    accepted = set(cfg.train.accept_changes or [])
    changed = [key for key in now if key != "train.accept_changes" and saved.get(key) != now[key]]
    refused = [key for key in changed if identity_field(key, data_read) and key not in accepted]
    if refused:
        details = "; ".join(f"{key}: {saved.get(key)!r} → {now[key]!r}" for key in refused)
        raise ResumeMismatchError(
            "resume", f"the config differs from the checkpoint {checkpoint}'s in what is trained ({details}). "
            "Resuming would train a different model or data from its weights. Restore these values, start a new "
            f"train.output_dir, or accept the change explicitly: --set 'train.accept_changes=[{', '.join(refused)}]'")
    return [f"{key} changed from {saved.get(key)!r} to {now[key]!r}" for key in changed]


def check_resume_data(saved: dict | None, now: dict, cfg: Config) -> None:
    """Refuse to resume onto different data: the corpus the checkpoint recorded (its files'
    identity: the sidecar's tokenizer fingerprint and counts, or sizes and a digest of the index)
    must be the corpus the config names now, unless ``data.path`` is in ``train.accept_changes``.
    Checkpoints from before this record pass."""
    if saved is None or "data.path" in (cfg.train.accept_changes or []):
        return
    for which in ("train", "valid"):
        if saved.get(which) != now.get(which):
            raise ResumeMismatchError(
                "resume", f"the {which} corpus differs from the one the checkpoint was trained on "
                f"(recorded {saved.get(which)}, now {now.get(which)}); resuming would continue on other data. "
                "If it is the same data moved or re-written, accept it: --set 'train.accept_changes=[data.path]'")


class RunLockError(MegamixError, RuntimeError):
    """Another process is training into the same run directory."""


class RunLock:
    """An exclusive ``flock`` on ``OUTPUT_DIR/.lock``, held until :meth:`release` or process exit
    (the kernel drops it when the holder dies, so a killed run never leaves a stale lock).  Taken
    again in the same process (a second Trainer in a notebook or a test), it is shared."""

    _held: dict[Path, tuple[int, int]] = {}  # resolved lock path → (fd, holders) in this process

    def __init__(self, output_dir: str | os.PathLike):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.path = (Path(output_dir) / ".lock").resolve()
        if self.path in RunLock._held:
            fd, holders = RunLock._held[self.path]
            RunLock._held[self.path] = (fd, holders + 1)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockError(f"{output_dir} is in use by {holder}: one run directory takes one training run at "
                               "a time (wait for it, stop it, or choose another train.output_dir)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        RunLock._held[self.path] = (fd, 1)

    def release(self) -> None:
        if getattr(self, "released", False) or self.path not in RunLock._held:
            return
        self.released = True
        fd, holders = RunLock._held.pop(self.path)
        if holders > 1:
            RunLock._held[self.path] = (fd, holders - 1)
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
