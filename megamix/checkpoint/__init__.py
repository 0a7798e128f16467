"""Checkpoints: where they live, how they commit, how every format is read — and that reading one
never runs code from it.

A checkpoint is ``OUTPUT_DIR/checkpoints/step_NNNNNNN/`` (N = optimizer steps done): the model and
optimizer state in one of two formats, plus ``train_state.json`` (step, consumed samples, RNG
states) and ``config.yaml``.  Modules, one job each:

- :mod:`~megamix.checkpoint.files`: names, format detection, the latest complete checkpoint, the
  training state and config beside the weights;
- :mod:`~megamix.checkpoint.commit`: the atomic commit protocol every format shares (write into
  ``.tmp_step_N``, rename when complete) and retention;
- :mod:`~megamix.checkpoint.dcp`: ``torch.distributed.checkpoint`` (any layout loads on any other);
- :mod:`~megamix.checkpoint.deepspeed`: reading DeepSpeed's format (``parallel.engine: deepspeed``);
- :mod:`~megamix.checkpoint.weights`: the whole model's weights from any checkpoint, and
  :func:`load_model`.

Nothing a checkpoint holds is unpickled as an arbitrary object: DCP's ``.metadata`` goes through an
allow-list unpickler, its tensors and its byte items (the optimizer's plain values) through
``torch.load(weights_only=True)``, DeepSpeed's files likewise with an allow-list of its own record
types, and the training state is JSON.
"""

from megamix.checkpoint.commit import PendingCheckpoint, begin_checkpoint, commit_checkpoint
from megamix.checkpoint.files import (
    STEP_DIR,
    TRAIN_STATE,
    CheckpointError,
    checkpoint_config,
    checkpoint_format,
    latest_checkpoint,
    read_train_state,
    resolve_checkpoint,
    step_dir_name,
)
from megamix.checkpoint.state import rng_state, set_rng_state


def __getattr__(name: str):
    """``load_model`` and ``read_weights`` on first use: they need ``torch.distributed.checkpoint``
    (and with it DTensor), which a one-process run should not pay for at start-up."""
    if name in ("load_model", "read_weights"):
        from megamix.checkpoint import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'megamix.checkpoint' has no attribute {name!r}")

__all__ = [
    "STEP_DIR",
    "TRAIN_STATE",
    "CheckpointError",
    "PendingCheckpoint",
    "begin_checkpoint",
    "checkpoint_config",
    "checkpoint_format",
    "commit_checkpoint",
    "latest_checkpoint",
    "load_model",
    "read_train_state",
    "read_weights",
    "resolve_checkpoint",
    "rng_state",
    "set_rng_state",
    "step_dir_name",
]
