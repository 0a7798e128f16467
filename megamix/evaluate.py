"""Validation loss and perplexity of a model on a token corpus (the trainer's periodic
evaluation and ``megamix evaluate`` share this)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    dataset,
    micro_batch_size: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict:
    """Token-weighted mean next-token loss over the first ``max_batches`` batches of ``dataset``
    (in order, so every evaluation sees the same samples), and its perplexity."""
    was_training = model.training
    model.eval()
    num_batches = len(dataset) // micro_batch_size
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    total, count = 0.0, 0
    for b in range(num_batches):
        tokens = torch.stack([dataset[i] for i in range(b * micro_batch_size, (b + 1) * micro_batch_size)]).to(device)
        with autocast or contextlib.nullcontext():
            logits = model(tokens[:, :-1])
        total += float(F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"))
        count += tokens[:, 1:].numel()
    model.train(was_training)
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}
