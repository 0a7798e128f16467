"""Build the model on the meta device under several 4-rank layouts and record each rank's shards.

Usage: ``torchrun --nproc-per-node 4 tests/dist/meta_init.py OUT_DIR``.  For every layout, each rank
builds its share with ``build_model_parts(..., init="meta")`` and reports, per parameter it holds,
the first element of its local shard and the standard deviation of that shard; rank 0 writes
``OUT/meta_init.json``: ``{layout: [{"pp", "tp", "dp", "params": {name: [first, std]}} per rank]}``.
``tests/test_parallel_training.py`` checks that shards are independent draws while replicas agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megamix.config import load_config
from megamix.config import validate
from megamix.parallel.mesh import ParallelMesh, init_distributed
from megamix.parallel.parallelize import build_model_parts

MODEL = ["model.vocab_size=512", "model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=4",
         "model.num_kv_heads=2", "model.num_layers=4", "model.max_seq_len=64", "data.seq_len=32",
         "train.micro_batch_size=2", "train.global_batch_size=8"]

# Every layout uses all four ranks; the name ends with its ZeRO stage when there is data parallelism.
LAYOUTS = {
    "pp2_tp2": ["parallel.pp=2", "parallel.tp=2"],
    "tp2_dp2_zero0": ["parallel.tp=2", "parallel.zero=0"],
    "tp2_dp2_zero2": ["parallel.tp=2", "parallel.zero=2"],
    "tp2_dp2_zero3": ["parallel.tp=2", "parallel.zero=3"],
    "pp2_dp2_zero3": ["parallel.pp=2", "parallel.zero=3"],
    "dp4_zero0": ["parallel.zero=0"],
    "dp4_zero3": ["parallel.zero=3"],
}


def shard_summary(model: torch.nn.Module) -> dict[str, list[float]]:
    """Per parameter: the first element of this rank's local shard and the shard's std."""
    summary = {}
    for name, param in model.named_parameters():
        local = (param.to_local() if isinstance(param, DTensor) else param).detach().flatten()
        summary[name] = [float(local[0]), float(local.std())]
    return summary


def main(out_dir: str) -> None:
    init_distributed()
    world = dist.get_world_size()
    results = {}
    for layout, overrides in LAYOUTS.items():
        cfg = validate(load_config(None, MODEL + overrides), world_size=world)
        mesh = ParallelMesh.from_config(cfg, "cpu")
        parts = build_model_parts(cfg, mesh, torch.device("cpu"), init="meta")
        row = {"pp": mesh.pp_rank, "tp": mesh.tp_rank, "dp": mesh.dp_rank, "params": shard_summary(parts.model)}
        rows = [None] * world
        dist.all_gather_object(rows, row)
        results[layout] = rows
    if dist.get_rank() == 0:
        (Path(out_dir) / "meta_init.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
