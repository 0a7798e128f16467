"""Run a model layer by layer, so the analyses can see between the blocks or leave one out.

The layer-effectiveness metrics need two things ``Transformer.forward`` does not offer: the
residual stream after every block, and the logits of the model with some blocks removed.  Both
come from the same plain loop over the model's own modules (embedding and its norm → blocks →
final norm → head), so the analysis never needs a change to the model and never re-implements a block.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterator

import torch
from torch import nn


def residual_stream(model: nn.Module, tokens: torch.Tensor, skip: Collection[int] = ()) -> Iterator[torch.Tensor]:
    """Yield the residual stream ``[batch, seq, hidden]`` entering each kept block, then leaving the last.

    With nothing skipped that is L+1 states x_0 … x_L: x_ℓ enters layer ℓ and x_L is the last
    block's output *before* the final norm.  Blocks whose global index is in ``skip`` are left out,
    as if they had never been there (the other blocks keep their own index, so LayerNorm Scaling's
    1/√(ℓ+1) and DeepNorm's constants do not shift).  A generator, so a caller that only wants the
    end does not hold every state of a deep model at once.
    """
    residual, pending = model.embed(tokens), None
    seq = residual.shape[1]
    cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
    yield residual
    for index, block in model.layers.items():
        if int(index) not in skip:
            residual, pending = block(residual, pending, cos, sin)
            yield block.stream(residual, pending)


def hidden_states(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """x_0 … x_L of the whole model (see :func:`residual_stream`)."""
    return list(residual_stream(model, tokens))


def logits(model: nn.Module, tokens: torch.Tensor, skip: Collection[int] = ()) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` of the model with the blocks in ``skip`` removed."""
    (last,) = deque(residual_stream(model, tokens, skip), maxlen=1)  # holds one state at a time
    return model.lm_head(model.norm(last))
