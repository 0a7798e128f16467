"""``train.precision: bf16_pure``, the reference code's precision: weights, gradients, Adam's moments
and the residual stream in bf16, in one process and under FSDP2, where mixed precision (``bf16``,
the default) keeps fp32 master weights and an fp32 stream.  DeepSpeed is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, torchrun, write_corpus

from megamix import load_model
from megamix.checkpoint.dcp import tensor_metadata
from megamix.config import ConfigError, load_config, validate
from megamix.plan import memory_per_rank
from megamix.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def stream_dtypes(trainer: Trainer) -> list[torch.dtype]:
    """The dtype of the residual stream entering each block, recorded as the model runs."""
    seen: list[torch.dtype] = []
    for block in trainer.engine.model.layers.values():
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    return seen


def adam_dtypes(trainer: Trainer) -> set[torch.dtype]:
    return {v.dtype for state in trainer.engine.optimizer.state.values()
            for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")}


def test_bf16_pure_trains_with_bf16_weights_adam_states_and_stream(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.precision=bf16_pure", "norm.scheme=mix", "norm.alpha=0.5",
                                  "train.steps=16", "train.eval_interval=0", "train.lr=1e-2"), device="cpu")
    streams = stream_dtypes(trainer)
    grads: set[torch.dtype] = set()
    trainer.engine.before_optimizer_step.append(
        lambda engine: grads.update(p.grad.dtype for p in engine.model.parameters()))
    records = [trainer.train_step() for _ in range(16)]
    assert {p.dtype for p in trainer.engine.model.parameters()} == {torch.bfloat16}
    assert grads == {torch.bfloat16}
    assert adam_dtypes(trainer) == {torch.bfloat16}
    assert set(streams) == {torch.bfloat16}  # Post-LN and Pre-LN layers alike
    assert trainer.engine.model.rope_cos.dtype == torch.bfloat16  # as the reference's cos/sin caches
    losses = [r["loss"] for r in records]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    # The checkpoint holds what trained: bf16 weights and moments (half of mixed precision's bytes).
    trainer.save()
    stored = tensor_metadata(tmp_path / "run" / "checkpoints" / "step_0000016")
    assert {meta.properties.dtype for meta in stored.values() if hasattr(meta, "size")} == {torch.bfloat16}
    model = load_model(tmp_path / "run")  # a plain fp32 model for analysis and export, same values
    assert model.layers["2"].mlp.up_proj.weight.dtype == torch.float32
    assert torch.equal(model.layers["2"].mlp.up_proj.weight,
                       trainer.engine.model.layers["2"].mlp.up_proj.weight.float())


def test_mixed_precision_stays_the_default_with_fp32_masters_and_stream(tiny_config):
    trainer = Trainer(tiny_config("train.precision=bf16", "train.steps=2", "train.eval_interval=0"), device="cpu")
    streams = stream_dtypes(trainer)
    trainer.train_step()
    assert {p.dtype for p in trainer.engine.model.parameters()} == {torch.float32}
    assert adam_dtypes(trainer) == {torch.float32}
    assert set(streams) == {torch.float32}
    for name in ("llama_71m", "llama_350m", "llama_7b"):
        assert load_config(ROOT / "configs" / f"{name}.yaml").train.precision == "bf16"


def test_bf16_pure_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="train.precision.*fsdp2"):
        validate(load_config(None, TINY + ["train.precision=bf16_pure", "parallel.engine=deepspeed",
                                           "parallel.zero=2"]))
    with pytest.raises(ConfigError, match="train.precision"):
        validate(load_config(None, TINY + ["train.precision=bf16_half"]))
    validate(load_config(None, TINY + ["train.precision=bf16_pure", "parallel.zero=3"]), world_size=2)


def test_plan_counts_bf16_pure_states_at_two_bytes():
    mixed = load_config(None, TINY + ["train.precision=bf16"])
    pure = load_config(None, TINY + ["train.precision=bf16_pure"])
    a, b = (memory_per_rank(c, 1_000_000, 0, 4, True) for c in (mixed, pure))
    assert b["optimizer"] == pytest.approx(a["optimizer"] / 2) and b["grads"] == pytest.approx(a["grads"] / 2)
    assert b["weights"] < a["weights"]


@pytest.mark.dist
def test_fsdp2_tp_and_pp_bf16_pure_match_one_process(tmp_path):
    """Two ranks under FSDP2 ZeRO-3, tensor parallelism and a pipeline: bf16 parameters on every rank
    (no fp32 master), bf16 gradients and Adam states, a bf16 stream (across stages too), and the
    single-process bf16_pure losses and gradient norms to a loose tolerance (bf16 rounding in a
    different order: FSDP2 reduces gradients in fp32 across ranks).  Measured: about 1e-5."""
    write_corpus(tmp_path / "corpus")
    base = TINY + [f"data.path={tmp_path / 'corpus'}", "train.micro_batch_size=2", "train.precision=bf16_pure",
                   "norm.scheme=mix", "norm.alpha=0.5", "train.eval_interval=0"]
    steps = 4
    layouts = {"dp2_zero3": ["parallel.zero=3"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}
    cases = [{"name": name, "overrides": base + layout + [f"train.output_dir={tmp_path / name}"], "steps": steps,
              "dtypes": True} for name, layout in layouts.items()]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "out").mkdir()
    torchrun(2, ROOT / "tests/dist/run_cases.py", tmp_path / "cases.json", tmp_path / "out")
    single = Trainer(load_config(None, base + [f"train.output_dir={tmp_path / 'single'}"]), device="cpu")
    expected = [single.train_step() for _ in range(steps)]
    for case in cases:
        got = json.loads((tmp_path / "out" / f"{case['name']}.json").read_text())
        assert got["dtypes"] == {"params": ["torch.bfloat16"], "grads": ["torch.bfloat16"],
                                 "stream": ["torch.bfloat16"], "adam": ["torch.bfloat16"]}, case["name"]
        for ref, rec in zip(expected, got["records"], strict=True):
            assert rec["loss"] == pytest.approx(ref["loss"], rel=1e-3), (case["name"], rec["step"])
            assert rec["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-2), (case["name"], rec["step"])
