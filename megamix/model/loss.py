"""The language-model loss: next-token cross-entropy, in fp32, and the z-loss's log²Z.

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


def log_z_squared(logits: torch.Tensor) -> torch.Tensor:
    """(log Z)², Z = Σ_v exp(logit_v) the softmax's normalizer, averaged over the tokens of
    ``logits [batch, seq, vocab]``, in fp32: PaLM's z-loss without its coefficient, which pulls log Z
    toward 0 so the logits cannot drift up together (``train.z_loss``)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
