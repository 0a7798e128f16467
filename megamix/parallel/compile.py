"""``train.compile``: each transformer block compiled by ``torch.compile`` on its own.

Per-block compilation (torchtitan's choice) keeps compile time flat in depth — every block of a
scheme compiles to the same graph and the cache serves the rest — and composes with what is
applied around the blocks: it comes after tensor parallelism and activation checkpointing and
before FSDP, which wraps the compiled blocks.  ``fullgraph`` makes a graph break an error: the
fused add+norm custom op (``megamix::add_norm_fwd``) is traced as one node, never a break.
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile every block of ``model`` (a whole model or a pipeline stage) in place, with
    ``backend`` (``train.compile_backend``; ``aot_eager`` traces forward and backward as inductor
    would but runs them eagerly: what the CPU tests use, and a debugging step on a GPU)."""
    for block in model.layers.values():
        block.compile(fullgraph=True, backend=backend)
