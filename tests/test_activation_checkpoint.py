"""``parallel.activation_checkpoint`` recomputes what it says, in one process too, and composes with
``train.compile``.

What is recomputed is read off the operators that run during ``backward()`` (a dispatch mode counts
them): without checkpointing the backward runs no forward operator; ``full`` reruns the whole block
(its matmuls and its SiLU); ``selective`` reruns the cheap elementwise work (SiLU) but keeps the
matmul outputs, so it runs exactly as many matmuls in the backward as no checkpointing does.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megamix.train.trainer import Trainer

aten = torch.ops.aten


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket] += 1
        return func(*args, **(kwargs or {}))


def backward_ops(tiny_config, mode: str) -> Counter:
    cfg = tiny_config(f"parallel.activation_checkpoint={mode}")
    engine = Trainer(cfg).engine
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with engine.autocast():
        loss = engine.loss(engine.model(tokens[:, :-1]), tokens[:, 1:])
    with CountOps() as counter:
        loss.backward()
    return counter.counts


def test_checkpointing_recomputes_what_its_mode_says_in_one_process(tiny_config):
    none, full, selective = (backward_ops(tiny_config, mode) for mode in ("none", "full", "selective"))
    assert none[aten.silu] == 0  # a plain backward runs no forward operator
    assert full[aten.silu] > 0 and full[aten.mm] > none[aten.mm]  # the whole block again
    assert selective[aten.silu] > 0 and selective[aten.mm] == none[aten.mm]  # elementwise only


def test_checkpointed_blocks_compile_and_train_like_eager(tiny_config, tmp_path):
    """``fullgraph`` compilation of checkpointed blocks (aot_eager: the traced forward and backward,
    without inductor's C++ build): the losses of plain eager training."""
    eager = Trainer(tiny_config("train.steps=3", "train.eval_interval=0",
                                f"train.output_dir={tmp_path / 'eager'}")).run()
    for mode in ("full", "selective"):
        compiled = Trainer(tiny_config("train.steps=3", "train.eval_interval=0", "train.compile=true",
                                       "train.compile_backend=aot_eager", f"parallel.activation_checkpoint={mode}",
                                       f"train.output_dir={tmp_path / mode}")).run()
        assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-5), mode
