"""Activation checkpointing per transformer block: trade recomputation for activation memory.

``full`` keeps only each block's input and recomputes the whole block in backward.  ``selective``
keeps what is expensive to recompute (matmul and attention outputs, and the results of collectives
so that tensor-parallel communication is not repeated) and recomputes the cheap elementwise work:
norms, rotary embeddings, SiLU and the residual adds.  Both run the block's ``forward`` inside
torch's non-reentrant ``torch.utils.checkpoint`` (set on the block instance, so parameter names and
checkpoints do not change), which ``torch.compile`` traces as part of the block's graph
(``train.compile``; torch's hook-based composable checkpoint cannot be traced with ``fullgraph``).
"""

from __future__ import annotations

import types
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megamix.model import Transformer

_aten = torch.ops.aten
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,
    torch.ops._c10d_functional.all_reduce.default,
}


def _save_expensive_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpoint(model: Transformer, mode: str) -> None:
    """Checkpoint every block of ``model`` (a whole model or a pipeline stage) in place."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"unknown activation checkpoint mode {mode!r}")
    for block in model.layers.values():
        block.forward = types.MethodType(_checkpointed_forward, block)
        block.checkpoint_mode = mode


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    """The block's own forward, its activations recomputed in the backward (all of them, or only
    the cheap ones for ``selective``)."""
    extra = {}
    if block.checkpoint_mode == "selective":
        extra["context_fn"] = partial(create_selective_checkpoint_contexts, _save_expensive_ops)
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **extra, **kwargs)
