"""``train.compile``: each transformer block compiled by ``torch.compile`` on its own.

Per-block compilation (torchtitan's choice) keeps compile time flat in depth — every block of a
scheme compiles to the same graph and the cache serves the rest — and composes with what is
applied around the blocks: it comes after tensor parallelism and activation checkpointing and
before FSDP, which wraps the compiled blocks.  ``fullgraph`` makes a graph break an error: the
fused add+norm custom op (``megamix::add_norm_fwd``) is traced as one node, never a break.
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> None:
    """Compile every block of ``model`` (a whole model or a pipeline stage) in place."""
    for block in model.layers.values():
        block.compile(fullgraph=True)
