"""The device mesh ``(pp, dp, tp)`` and every process group: the one module that knows the layout.

Ranks are laid out with ``tp`` fastest, then ``dp``, then ``pp`` (Megatron's order): the ranks of a
tensor-parallel group are neighbours, so on a GPU node they share NVLink, and a pipeline stage is a
contiguous block of ``dp × tp`` ranks.  Everything else (tensor, pipeline and data parallelism, the
gradient-norm reductions, checkpoints) asks this module for its sub-mesh, group or rank.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megamix.config import Config

MESH_DIMS = ("pp", "dp", "tp")


def init_distributed(timeout_s: float = 1800.0) -> int:
    """Join the process group torchrun/srun describe in the environment; returns the world size.

    NCCL carries the collectives on GPUs and gloo on CPUs (a CPU backend is kept beside NCCL for
    asynchronous checkpoint saves).  One process needs no group at all.
    """
    if dist.is_initialized():
        return dist.get_world_size()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_world_size()


class ParallelMesh:
    """The ``(pp, dp, tp)`` mesh of a run, its sub-meshes, groups and this process's coordinates."""

    def __init__(self, pp: int, dp: int, tp: int, device_type: str):
        self.pp, self.dp, self.tp = pp, dp, tp
        self.mesh: DeviceMesh = init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=MESH_DIMS)
        self.pp_rank = self.mesh.get_local_rank("pp")
        self.dp_rank = self.mesh.get_local_rank("dp")
        self.tp_rank = self.mesh.get_local_rank("tp")

    @classmethod
    def from_config(cls, cfg: Config, device_type: str) -> ParallelMesh:
        p = cfg.parallel
        return cls(p.pp, p.dp, p.tp, device_type)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    def __repr__(self) -> str:
        return (f"ParallelMesh(pp={self.pp}, dp={self.dp}, tp={self.tp}; "
                f"rank pp={self.pp_rank} dp={self.dp_rank} tp={self.tp_rank})")
