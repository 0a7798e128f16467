"""Pipeline parallelism: cut the model into stages by global layer index and run them with a
``torch.distributed.pipelining`` schedule.

A stage is the plain :class:`~megamix.model.Transformer` with the layers of other stages removed
(and without the embedding, or the final norm and head, where another stage holds them).  Blocks
keep the global index they were built with, so a Mix-LN Post-LN layer is Post-LN on whichever stage
it lands, and parameter names are those of the full model on every layout.  With
``virtual_stages`` > 1 a rank holds several stages, dealt round-robin (stage ``s`` on rank
``s mod pp``), as the looped schedules (interleaved 1F1B, zero bubble) expect.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    _PipelineSchedule,
)

from megamix.model import Transformer
from megamix.parallel.stages import stage_of_layers

SINGLE_STAGE_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
LOOPED_SCHEDULES = {"interleaved_1f1b": ScheduleInterleaved1F1B, "zero_bubble": ScheduleInterleavedZeroBubble}


def keep_stage(model: Transformer, stage: int, num_stages: int, stage_layers: list[int] | None = None) -> Transformer:
    """Reduce ``model`` in place to pipeline stage ``stage``: its layers (by global index), the
    embedding (its scale and norm) on the first stage, the final norm and head on the last."""
    layer_stage = stage_of_layers(model.cfg.num_layers, num_stages, stage_layers)
    for key in list(model.layers.keys()):
        if layer_stage[int(key)] != stage:
            del model.layers[key]
    if stage != 0:
        model.embed_tokens = None
        model.embed_scale = None
        model.embed_norm = None
    if stage != num_stages - 1:
        model.norm = None
        model.lm_head = None
    return model


class RankModel(nn.Module):
    """The stages one pipeline rank holds, seen as one module with the full model's names.

    It is never called; it exists so the optimizer, the gradient norms and checkpoints address this
    rank's parameters as ``layers.12.mlp.up_proj.weight`` etc., exactly as a single process does.
    """

    def __init__(self, stages: list[Transformer]):
        super().__init__()
        self.schemes = stages[0].schemes
        self.embed_tokens = next((s.embed_tokens for s in stages if s.embed_tokens is not None), None)
        self.embed_scale = next((s.embed_scale for s in stages if s.embed_scale is not None), None)
        self.embed_norm = next((s.embed_norm for s in stages if s.embed_norm is not None), None)
        self.layers = nn.ModuleDict({key: block for s in stages for key, block in s.layers.items()})
        self.norm = next((s.norm for s in stages if s.norm is not None), None)
        self.lm_head = next((s.lm_head for s in stages if s.lm_head is not None), None)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline rank's model runs through its schedule, not as one module")


def build_schedule(
    name: str,
    stage_modules: list[Transformer],
    stage_ids: list[int],
    num_stages: int,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    group: dist.ProcessGroup,
) -> _PipelineSchedule:
    """Wrap each local stage in a ``PipelineStage`` and build the named schedule over them.

    ``loss_fn`` returns a micro-batch's mean loss; the schedule divides gradients by the number of
    micro-batches, so a step's gradient is that of the mean over the whole batch.
    """
    stages = [
        PipelineStage(module, stage_index=s, num_stages=num_stages, device=device, group=group)
        for module, s in zip(stage_modules, stage_ids)
    ]
    if name in SINGLE_STAGE_SCHEDULES:
        if len(stages) != 1:
            raise ValueError(f"the {name} schedule runs one stage per rank; got {len(stages)}")
        return SINGLE_STAGE_SCHEDULES[name](stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    if name in LOOPED_SCHEDULES:
        return LOOPED_SCHEDULES[name](stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    raise ValueError(f"unknown pipeline schedule {name!r}")
