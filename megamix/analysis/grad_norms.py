"""Per-layer gradient norms of a trained model, measured on a few batches.

Mix-LN's central diagnostic: under Pre-LN the deep layers receive much smaller gradients than the
shallow ones, under Post-LN the shallow ones do, and Mix-LN evens them out.  The trainer logs the
same quantity while training (``grad_norm/layer_XX`` in ``metrics.jsonl``); this measures it for
any checkpoint, with the parameters frozen at that point.
"""

from __future__ import annotations

import torch
from torch import nn

from megamix.model import lm_loss
from megamix.parallel.grad_norm import grad_norms


def checkpoint_grad_norms(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    """sqrt(Σ‖∇W‖²) over each layer's parameters for the loss of each batch, and the mean over batches.

    Returns ``{"per_batch": [[norm of layer 0, …], …], "mean": [… per layer]}``.  The model's
    gradients are cleared before and after, so this can run on a model in the middle of anything.
    """
    per_batch = []
    for tokens in batches:
        model.zero_grad(set_to_none=True)
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        _, norms = grad_norms(model, len(model.layers))
        per_batch.append([norms[i] for i in sorted(norms)])
    model.zero_grad(set_to_none=True)
    mean = [sum(column) / len(column) for column in zip(*per_batch)]
    return {"per_batch": per_batch, "mean": mean}
