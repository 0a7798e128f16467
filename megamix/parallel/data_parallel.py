"""Data parallelism over the ``dp`` mesh dimension with FSDP2, by ZeRO stage.

- ``zero: 3``: parameters, gradients and optimizer states are sharded; each block's parameters are
  gathered for its forward, freed after it, and gathered again for its backward.
- ``zero: 2``: the same sharding at rest, but gathered parameters stay until the block's backward
  (no second all-gather).  Under pipeline parallelism this is the right default: a stage runs many
  micro-batch forwards before their backwards, and re-gathering for each would multiply traffic.
- ``zero: 0``: plain replication; gradients are all-reduced once per step (torch's FSDP-based
  ``replicate``, so all stages share one engine and one checkpoint format).

Under ``bf16`` the gathered parameters are cast to bf16 for compute while the sharded fp32
parameters stay the master copy that the optimizer updates; gradients are reduced in fp32.  Under
``bf16_pure`` the parameters themselves are bf16 (``megamix.parallel.precision``): gathered as they
are, no fp32 master copy; gradients are reduced in fp32 and stored in bf16.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from megamix.model import Transformer


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16 compute copies of the parameters, fp32 gradient reduction.  Block inputs are not cast:
    the residual stream stays fp32 between blocks (the model's ``stream_dtype``), and the trainer's
    autocast runs the matmuls in bf16."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    if precision == "bf16_pure":  # the parameters are bf16 already: no compute copy, no master copy
        return MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def apply_data_parallel(model: Transformer, dp_mesh: DeviceMesh, zero: int, precision: str = "fp32") -> None:
    """Shard (or replicate) ``model`` — a whole model or a pipeline stage — over ``dp_mesh``."""
    mp_policy = mixed_precision_policy(precision)
    if zero == 0:
        replicate(model, mesh=dp_mesh, mp_policy=mp_policy)
        return
    if zero not in (2, 3):
        raise ValueError(f"FSDP2 implements ZeRO stages 0, 2 and 3, not {zero}")
    reshard = zero == 3
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
    # The embedding, final norm and head form the root group.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp_policy)


def data_parallel_modules(modules: list[nn.Module]) -> list[FSDPModule]:
    """The FSDP-managed roots among ``modules`` (the model or its pipeline stages)."""
    return [m for m in modules if isinstance(m, FSDPModule)]


def set_gradient_sync(modules: list[nn.Module], enabled: bool) -> None:
    """Reduce gradients across ``dp`` on this backward or only accumulate them locally (all but the
    last micro-batch of a step)."""
    for m in data_parallel_modules(modules):
        m.set_requires_gradient_sync(enabled)


def reshard(modules: list[nn.Module]) -> None:
    """Free gathered parameters (e.g. after a no-grad evaluation forward under ``zero: 2``)."""
    for root in data_parallel_modules(modules):
        for m in root.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
