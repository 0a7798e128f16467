"""Gradient norms over the whole model, however it is split: global clipping and per-layer norms.

Every rank holds some gradient elements; an element may live on several ranks (a norm weight is
replicated over ``tp``, every parameter over ``dp`` under ``zero: 0``).  Each rank sums the squares
of its local gradients, each divided by the number of ranks holding that element, and one
all-reduce over the world adds them up: every element counts exactly once, on any layout.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

from megamix.parallel.mesh import ParallelMesh


def _norm(grad: torch.Tensor) -> torch.Tensor:
    """‖grad‖₂ with fp32 accumulation, without a squared or fp64 copy of the gradient."""
    return torch.linalg.vector_norm(grad.detach(), dtype=torch.float32)


def copies_per_element(param: torch.Tensor, mesh: ParallelMesh | None) -> int:
    """On how many ranks of its pipeline stage each element of ``param`` lives."""
    if mesh is None:
        return 1
    copies = mesh.dp * mesh.tp
    if isinstance(param, DTensor):
        for size, placement in zip(param.device_mesh.shape, param.placements):
            if placement.is_shard() or isinstance(placement, _StridedShard):
                copies //= size
    return copies


def grad_norms(model: nn.Module, num_layers: int, mesh: ParallelMesh | None) -> tuple[float, dict[int, float]]:
    """The global L2 norm of all gradients and the norm of each layer's gradients,
    sqrt(Σ‖∇W‖²), keyed by global layer index; identical on every rank."""
    squares = None
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
            # e.g. the vocab-parallel embedding's gradient comes back replicated: keep only this
            # rank's shard, which is all the optimizer needs and what the count below assumes.
            param.grad = param.grad.redistribute(param.grad.device_mesh, param.placements)
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        if squares is None:
            squares = torch.zeros(num_layers + 1, dtype=torch.float64, device=grad.device)
        parts = name.split(".")
        slot = int(parts[1]) if parts[0] == "layers" else num_layers  # the last slot: embedding, norm, head
        squares[slot] += _norm(grad).double().square() / copies_per_element(param, mesh)
    if squares is None:
        squares = torch.zeros(num_layers + 1, dtype=torch.float64)
    if mesh is not None:
        if squares.device.type == "cpu" and mesh.mesh.device_type != "cpu":
            squares = squares.to(mesh.mesh.device_type)
        dist.all_reduce(squares)  # the world: all stages, data and tensor ranks
    values = squares.cpu().tolist()
    return math.sqrt(sum(values)), {i: math.sqrt(values[i]) for i in range(num_layers)}


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
