"""``train.compile``: per-block ``torch.compile`` trains like eager (same losses to a tolerance),
and the fused add+norm custom op stays inside the compiled graph (``fullgraph``: no break)."""

import pytest
import torch

from megamix.model import Block
from megamix.ops import fused_norm
from megamix.train.trainer import Trainer

pytestmark = pytest.mark.slow  # inductor compiles C++ on the CPU: tens of seconds


def test_compiled_blocks_train_like_eager(tiny_config, tmp_path):
    overrides = ["train.steps=4", "norm.scheme=mix", "norm.alpha=0.5", "train.eval_interval=0"]
    eager = Trainer(tiny_config(*overrides, f"train.output_dir={tmp_path / 'eager'}")).run()
    compiled_trainer = Trainer(tiny_config(*overrides, "train.compile=true",
                                           f"train.output_dir={tmp_path / 'compiled'}"))
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None
               for block in compiled_trainer.engine.model.layers.values())
    compiled = compiled_trainer.run()
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_the_fused_custom_op_is_traced_inside_the_block_graph(tiny_config, monkeypatch):
    """The op path (what CUDA tensors take) compiled with fullgraph: the custom op appears in the
    graph and the result equals the eager block's."""
    monkeypatch.setattr(fused_norm, "add_norm_reference", fused_norm.add_norm_op)
    trainer = Trainer(tiny_config("norm.scheme=mix", "norm.alpha=0.5"))
    block: Block = trainer.engine.model.layers["0"]  # a Post-LN block: the fused add inside
    x = torch.randn(2, 8, 32)
    cos, sin = trainer.engine.model.rope_cos[:8], trainer.engine.model.rope_sin[:8]
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    got = Block.stream(*compiled(x, None, cos, sin))
    torch.testing.assert_close(got, Block.stream(*block(x, None, cos, sin)))
    ops = {str(node.target) for graph in counter.graphs for node in graph.graph.nodes}
    assert any("megamix.add_norm_fwd" in op for op in ops), ops
