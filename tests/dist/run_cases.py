"""Train several parallel layouts in one ``torchrun`` world, for ``tests/test_parallel_training.py``.

Usage: ``torchrun --nproc-per-node N tests/dist/run_cases.py SPEC_JSON OUT_DIR``.  ``SPEC_JSON`` is a
list of cases, run one after another on the same process group; each case is a dict with

- ``name``, ``overrides`` (``section.key=value`` strings for :func:`megamix.config.load_config`),
  ``steps`` (how many ``Trainer.train_step`` calls);
- ``grads``: every rank writes ``OUT/{name}.grads.{rank}.pt``, the full (unsharded) first-step
  gradient of each parameter it holds, by the single-process model's parameter name;
- ``evaluate``: also run ``Trainer.evaluate`` after the steps;
- ``probe_zero``: record, after every training forward, whether a block's FSDP parameters are back
  to their data-parallel shard (ZeRO-3) or still the gathered full tensor (ZeRO-2);
- ``save``: save a checkpoint after the steps and wait for it to be committed;
- ``dtypes``: record the dtypes of this rank's parameters, gradients at the first step, Adam
  moments after the steps, and the residual stream entering each block.

Rank 0 writes ``OUT/{name}.json``: ``{"records": [...], "eval": {...}, "sharded_after_forward": [...]}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megamix.config import load_config
from megamix.parallel.mesh import init_distributed
from megamix.train.trainer import Trainer


def capture_first_step_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Fill the returned dict, at the first optimizer step, with the full gradient of every
    parameter this rank holds (the moment the single-process reference captures it too)."""
    grads: dict[str, torch.Tensor] = {}

    def capture(engine):
        if not grads:
            for name, param in engine.model.named_parameters():  # same order on every rank of a stage
                grad = param.grad
                if grad is None:
                    continue
                grad = grad.full_tensor() if isinstance(grad, DTensor) else grad  # a collective
                grads[name] = grad.detach().cpu().clone()

    trainer.engine.before_optimizer_step.append(capture)
    return grads


def is_dp_shard(param: torch.Tensor) -> bool:
    """Whether an FSDP parameter is its data-parallel shard: FSDP2 swaps the module's attribute to
    the gathered tensor (not a DTensor over ``dp``) while the parameter is unsharded."""
    return isinstance(param, DTensor) and "dp" in (param.device_mesh.mesh_dim_names or ())


def probe_sharding_after_forward(trainer: Trainer) -> tuple[list[bool], torch.utils.hooks.RemovableHandle]:
    """Record, after each forward of the first block, whether its parameters were resharded.

    The hook is registered after ``fully_shard``, so it runs after FSDP's own post-forward hook."""
    block = next(iter(trainer.engine.stages[0].layers.values()))
    seen: list[bool] = []

    def hook(module, args, output):
        if torch.is_grad_enabled():  # training forwards only (not recomputation or evaluation)
            seen.append(all(is_dp_shard(p) for p in (module.attention.q_proj.weight, module.mlp.up_proj.weight)))

    return seen, block.register_forward_hook(hook)


def probe_dtypes(trainer: Trainer) -> dict:
    """The dtypes of parameters (their local shards), first-step gradients and the residual stream
    entering each block, as sorted lists of names (filled in as training runs)."""
    seen: dict = {"params": sorted({str(p.dtype) for p in trainer.engine.model.parameters()}),
                  "grads": [], "stream": []}

    def grads(engine):
        if not seen["grads"]:
            seen["grads"] = sorted({str(p.grad.dtype) for p in engine.model.parameters() if p.grad is not None})

    def stream(module, args):
        name = str(args[0].dtype)
        if name not in seen["stream"]:
            seen["stream"].append(name)

    trainer.engine.before_optimizer_step.append(grads)
    for stage in trainer.engine.stages:
        for block in stage.layers.values():
            block.register_forward_pre_hook(stream)
    return seen


def run_case(spec: dict, out: Path) -> None:
    trainer = Trainer(load_config(None, spec["overrides"]))
    rank = dist.get_rank()
    grads = capture_first_step_grads(trainer) if spec.get("grads") else None
    probe = probe_sharding_after_forward(trainer) if spec.get("probe_zero") else None
    dtypes = probe_dtypes(trainer) if spec.get("dtypes") else None
    records = [trainer.train_step() for _ in range(spec["steps"])]
    result: dict = {"records": records}
    if dtypes is not None:
        dtypes["adam"] = sorted({str(v.dtype) for state in trainer.engine.optimizer.state.values()
                                 for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")})
        result["dtypes"] = dtypes
    if probe is not None:
        sharded, handle = probe
        handle.remove()
        result["sharded_after_forward"] = sharded
    if spec.get("evaluate"):
        result["eval"] = trainer.evaluate()
    if spec.get("save"):
        trainer.save()
        trainer.wait_for_save()
    trainer.metrics.close()
    if grads is not None:
        torch.save(grads, out / f"{spec['name']}.grads.{rank}.pt")
    if rank == 0:
        (out / f"{spec['name']}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()


def main(spec_file: str, out_dir: str) -> None:
    init_distributed()
    out = Path(out_dir)
    for spec in json.loads(Path(spec_file).read_text()):
        run_case(spec, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
