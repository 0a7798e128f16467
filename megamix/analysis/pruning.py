"""Performance drop per removed layer: how much worse the model gets without layer ℓ.

The papers remove one layer at a time, without retraining, and report the drop in MMLU accuracy;
a layer whose removal costs nothing was not pulling its weight.  Offline we measure the same thing
as the increase in validation loss (and perplexity) on a fixed set of token batches.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn

from megamix.analysis.hidden_states import logits
from megamix.model import lm_loss


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped like the trainer's val_ppl: a broken model reads ~5e21, not inf


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[torch.Tensor], skip: Collection[int] = ()) -> float:
    """Token-weighted mean next-token loss over ``batches`` (each ``[batch, seq + 1]``), with the
    blocks in ``skip`` removed."""
    total, count = 0.0, 0
    for tokens in batches:
        total += float(lm_loss(logits(model, tokens[:, :-1], skip), tokens[:, 1:], reduction="sum"))
        count += tokens[:, 1:].numel()
    return total / count


def layer_removal(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    """The full model's loss and, for each layer ℓ, the loss without ℓ and the increase over the full
    model (positive: the layer helps)."""
    full = validation_loss(model, batches)
    layers = []
    for index in model.layers:
        loss = validation_loss(model, batches, skip={int(index)})
        layers.append({
            "layer": int(index),
            "loss": loss,
            "ppl": perplexity(loss),
            "loss_increase": loss - full,
            "ppl_increase": perplexity(loss) - perplexity(full),
        })
    return {"loss": full, "ppl": perplexity(full), "layers": layers}
