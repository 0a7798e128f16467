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


@pytest.mark.parametrize("overrides", [["norm.scheme=hybrid_star", "norm.embedding_norm=true"],
                                       ["norm.scheme=olmo2", "norm.type=dyt"]])
def test_blocks_with_attention_norms_and_dyt_compile_without_graph_breaks(tiny_config, overrides):
    """q/k/v norms (per head and over the whole projection), HybridNorm's after-add norm and DyT
    trace as one graph per block (``fullgraph``) and compute the eager block's output."""
    from torch._dynamo.testing import CompileCounterWithBackend

    trainer = Trainer(tiny_config(*overrides))
    model = trainer.engine.model
    x = torch.randn(2, 8, 32)
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    for block in list(model.layers.values())[:2]:
        torch.compiler.reset()  # each block traced afresh, not as a recompile of the blocks before it
        counter = CompileCounterWithBackend("eager")
        got = Block.stream(*torch.compile(block, backend=counter, fullgraph=True)(x, None, cos, sin))
        torch.testing.assert_close(got, Block.stream(*block(x, None, cos, sin)))
        assert counter.frame_count == 1
