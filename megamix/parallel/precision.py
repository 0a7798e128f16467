"""``train.precision``: what dtype the weights, the optimizer states and the residual stream have.

- ``fp32``: everything fp32.
- ``bf16`` (mixed precision, the default of the paper configs): fp32 parameters, gradients and Adam
  states; matrix multiplies in bf16 under the trainer's autocast (FSDP2 gathers bf16 compute copies
  and reduces gradients in fp32); the residual stream stays fp32 between sublayers.
- ``bf16_pure`` (the reference code's precision: it casts the model to bf16 and builds Adam on it):
  parameters, gradients, Adam's moments and the residual stream all bf16, no fp32 master copy and
  no autocast.  The one key sets both the model's dtype and its ``stream_dtype``.

This module casts a freshly built model (or pipeline stage) before it is sharded, so every layout
holds the same dtype: one process, FSDP2 (``param_dtype`` is the parameters' own), tensor and
pipeline parallelism.  DeepSpeed is refused at config time (its engine here keeps fp32 parameters).
"""

from __future__ import annotations

import torch
from torch import nn

PURE = {"bf16_pure": torch.bfloat16}  # precision → the dtype of weights, optimizer states and stream


def is_pure(precision: str) -> bool:
    return precision in PURE


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """Cast ``model`` (a ``Transformer`` or a pipeline stage of one; on any device, meta included)
    to the precision's storage dtype and keep its residual stream in it; a no-op for fp32 and
    mixed precision.  Floating buffers (the rotary tables) are cast too, as the reference's
    ``model.to(dtype=torch.bfloat16)`` casts its cos/sin caches."""
    dtype = PURE.get(precision)
    if dtype is None:
        return model
    model.to(dtype)
    for module in model.modules():
        if hasattr(module, "stream_dtype"):
            module.stream_dtype = dtype
    return model
