"""Which global layers each pipeline stage holds, and which pipeline rank holds each stage."""

from __future__ import annotations


def stage_layer_counts(num_layers: int, num_stages: int, stage_layers: list[int] | None = None) -> list[int]:
    """Layers per stage: ``stage_layers`` when given, else balanced (earlier stages take the
    remainder, since the last stage also carries the LM head)."""
    if stage_layers is not None:
        return list(stage_layers)
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def stage_of_layers(num_layers: int, num_stages: int, stage_layers: list[int] | None = None) -> list[int]:
    """The stage index of every global layer."""
    stages = []
    for s, count in enumerate(stage_layer_counts(num_layers, num_stages, stage_layers)):
        stages += [s] * count
    return stages


def stage_to_rank(stage: int, pp: int) -> int:
    """Pipeline rank of a (virtual) stage: stages are dealt round-robin (looped schedules)."""
    return stage % pp


def stages_of_rank(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The (virtual) stage indices pipeline rank ``pp_rank`` holds: the inverse of :func:`stage_to_rank`."""
    return [pp_rank + k * pp for k in range(virtual_stages)]
