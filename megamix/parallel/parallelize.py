"""Build this rank's share of the model: pipeline stages, then tensor parallelism, activation
checkpointing and data parallelism, applied in that order to the plain model (torchtitan's order:
FSDP must see the tensor-parallel DTensors and the checkpointed blocks)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import _random as dtensor_random

from megamix.config import Config
from megamix.model import Transformer, num_parameters
from megamix.parallel.activation_checkpoint import apply_activation_checkpoint
from megamix.parallel.compile import apply_compile
from megamix.parallel.data_parallel import apply_data_parallel
from megamix.parallel.mesh import ParallelMesh
from megamix.parallel.pipeline import RankModel, keep_stage
from megamix.parallel.precision import apply_precision
from megamix.parallel.stages import stages_of_rank
from megamix.parallel.tensor_parallel import apply_tensor_parallel

# Up to this size every rank initializes the whole model on the host from the run's seed, exactly
# as one process would, and keeps its shards: any layout then starts from the same weights.
# Larger models are built on the meta device and initialized shard by shard (no host copy).
HOST_INIT_MAX_PARAMS = 2_000_000_000


@dataclass
class ModelParts:
    stages: list[Transformer]  # the modules this rank runs: one per local pipeline stage
    stage_ids: list[int]
    model: nn.Module  # all of this rank's parameters under the full model's names
    num_params: int  # of the whole model, all ranks together


def _shard_seed(cfg: Config, mesh: ParallelMesh, stage: int) -> int:
    """The seed for initializing this rank's shards of ``stage`` on their own: it differs wherever
    the parameters are split (stage, tensor rank, and data rank under ZeRO 2/3) and agrees where
    they are replicated, so no two shards of a tensor repeat each other and replicas stay equal."""
    dp_rank = mesh.dp_rank if cfg.parallel.zero >= 2 else 0
    return hash((cfg.train.seed, stage, mesh.tp_rank, dp_rank)) % 2**63


def _seed_shard_init(seed: int, mesh: ParallelMesh, device: torch.device) -> None:
    """Seed this rank's draws for its shards.  On GPUs DTensor's random ops go through an RNG
    tracker which, when it creates itself lazily at the first draw, copies global rank 0's generator
    state to every rank, so every pipeline stage would repeat stage 0's numbers; creating it here,
    without that copy, keeps each rank's own seed."""
    torch.manual_seed(seed)
    if device.type != "cpu":
        dtensor_random.manual_seed(seed, mesh.mesh)


def build_model_parts(cfg: Config, mesh: ParallelMesh, device: torch.device, init: str | None = None) -> ModelParts:
    """This rank's stages, sharded per ``cfg.parallel``.

    ``init`` is ``"host"`` (the whole model from ``train.seed`` on every rank, then sharded: the
    same weights as a single process) or ``"meta"`` (built empty, each rank drawing its own shards
    from the same distributions, not the same numbers as one process); by default ``host`` up to
    :data:`HOST_INIT_MAX_PARAMS` parameters.
    """
    p = cfg.parallel
    with torch.device("meta"):
        full = Transformer(cfg.model, cfg.norm)
    total = num_parameters(full)
    init = init or ("host" if total <= HOST_INIT_MAX_PARAMS else "meta")
    torch.manual_seed(cfg.train.seed)
    if init == "host":
        full = Transformer(cfg.model, cfg.norm)
    num_stages = p.pp * p.virtual_stages
    stage_ids = stages_of_rank(mesh.pp_rank, p.pp, p.virtual_stages) if p.pp > 1 else [0]
    stages = []
    for s in stage_ids:
        module = copy.deepcopy(full) if len(stage_ids) > 1 else full
        if p.pp > 1:
            keep_stage(module, s, num_stages, p.stage_layers)
        apply_precision(module, cfg.train.precision)  # bf16_pure: bf16 before sharding, on every layout
        if init == "host":
            module.to(device)
        if p.tp > 1:
            apply_tensor_parallel(module, mesh.tp_mesh, p.sequence_parallel)
            if cfg.model.tie_embeddings:  # each side was distributed separately; tie the shards again
                module.lm_head.weight = module.embed_tokens.weight
        apply_activation_checkpoint(module, p.activation_checkpoint)
        if cfg.train.compile:
            apply_compile(module, cfg.train.compile_backend)
        if p.dp > 1:
            apply_data_parallel(module, mesh.dp_mesh, p.zero, cfg.train.precision)
        if init == "meta":
            module.to_empty(device=device)
            if cfg.model.tie_embeddings:
                module.lm_head.weight = module.embed_tokens.weight
            _seed_shard_init(_shard_seed(cfg, mesh, s), mesh, device)
            module.init_weights()
        stages.append(module)
    model = stages[0] if len(stages) == 1 else RankModel(stages)
    return ModelParts(stages, stage_ids, model, total)
