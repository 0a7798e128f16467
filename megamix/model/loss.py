"""The language-model loss: next-token cross-entropy, in fp32.

The trainer, every engine, evaluation, the layer-removal analysis and the gradient-norm analysis
compute it here.  Under tensor parallelism the logits are a vocabulary-sharded DTensor and the same
call runs inside torch's ``loss_parallel`` (``megamix.parallel.tensor_parallel``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits [batch, seq, vocab]`` against ``targets [batch, seq]`` (the inputs
    shifted by one), computed in fp32; ``reduction`` as in ``F.cross_entropy`` (mean over tokens)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
