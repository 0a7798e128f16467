"""Gradient norms over the whole model, however it is split: global clipping and per-layer norms.

Every rank holds some gradient elements; an element may live on several ranks (a norm weight is
replicated over ``tp``, every parameter over ``dp`` under ``zero: 0``).  Each rank sums the squares
of its local gradients, each divided by the number of ranks holding that element, and one
all-reduce over the world adds them up: every element counts exactly once, on any layout.  Every
engine (FSDP2 and DeepSpeed alike), the trainer's logs and the checkpoint analysis reduce their
gradients through :func:`layer_grad_norms`, which reads layer indices with
:func:`megamix.model.layer_of`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from megamix.model import layer_of

if TYPE_CHECKING:
    from megamix.parallel.mesh import ParallelMesh


def _dtensor_type() -> type | None:
    """DTensor, if anything imported it: no tensor can be one otherwise, and a one-process run
    need not pay DTensor's import at start-up."""
    module = sys.modules.get("torch.distributed.tensor")
    return module.DTensor if module is not None else None


def layer_grad_norms(
    grads: Iterable[tuple[str, torch.Tensor, int]], num_layers: int, reduce: bool = False,
    device: torch.device | str | None = None,
) -> tuple[float, dict[int, float]]:
    """The L2 norm of all gradients and of each layer's, sqrt(Σ‖∇W‖²), keyed by global layer index.

    ``grads`` yields ``(parameter name, this rank's local gradient, on how many ranks each of its
    elements lives)``; with ``reduce`` the squares are summed over the world (one all-reduce of
    L + 1 numbers), so every rank returns the same norms.
    """
    squares = None
    for name, grad, copies in grads:
        if squares is None:
            squares = torch.zeros(num_layers + 1, dtype=torch.float64, device=grad.device)
        layer = layer_of(name)
        slot = num_layers if layer is None else layer  # the last slot: embedding, final norm, head
        # ‖grad‖₂ with fp32 accumulation, without a squared or fp64 copy of the gradient
        squares[slot] += torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).double().square() / copies
    if squares is None:
        squares = torch.zeros(num_layers + 1, dtype=torch.float64, device=device)
    if reduce and dist.is_initialized():
        if device is not None and squares.device != torch.device(device):
            squares = squares.to(device)
        dist.all_reduce(squares)  # the world: all stages, data and tensor ranks
    values = squares.cpu().tolist()
    return math.sqrt(sum(values)), {i: math.sqrt(values[i]) for i in range(num_layers)}


def copies_per_element(param: torch.Tensor, mesh: ParallelMesh | None) -> int:
    """On how many ranks of its pipeline stage each element of ``param`` lives."""
    if mesh is None:
        return 1
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard

    copies = mesh.dp * mesh.tp
    if isinstance(param, DTensor):
        for size, placement in zip(param.device_mesh.shape, param.placements):
            if placement.is_shard() or isinstance(placement, _StridedShard):
                copies //= size
    return copies


def local_grads(model: nn.Module, mesh: ParallelMesh | None) -> Iterable[tuple[str, torch.Tensor, int]]:
    """``(name, local gradient, copies)`` of every parameter of this rank that has a gradient."""
    dtensor = _dtensor_type() or ()
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if isinstance(param.grad, dtensor) and param.grad.placements != param.placements:
            # e.g. the vocab-parallel embedding's gradient comes back replicated: keep only this
            # rank's shard, which is all the optimizer needs and what the count assumes.
            param.grad = param.grad.redistribute(param.grad.device_mesh, param.placements)
        grad = param.grad.to_local() if isinstance(param.grad, dtensor) else param.grad
        yield name, grad, copies_per_element(param, mesh)


def grad_norms(model: nn.Module, num_layers: int, mesh: ParallelMesh | None = None) -> tuple[float, dict[int, float]]:
    """Global and per-layer gradient norms of a model, whole or this rank's share of it."""
    device = mesh.mesh.device_type if mesh is not None else None
    return layer_grad_norms(local_grads(model, mesh), num_layers, reduce=mesh is not None, device=device)


@torch.no_grad()
def clip_gradients(model: nn.Module, total_norm: float, max_norm: float) -> None:
    """Scale all gradients by ``max_norm / total_norm`` when the norm exceeds ``max_norm``
    (torch's ``clip_grad_norm_`` rule, applied with the global norm on every rank)."""
    coef = max_norm / (total_norm + 1e-6)
    if coef >= 1.0:
        return
    for param in model.parameters():
        if param.grad is not None:
            param.grad.mul_(coef)
