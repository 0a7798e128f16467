"""Layouts without processes: the errors a bad layout raises, stages cut by global layer index, and
``megamix plan``'s per-rank shapes (built by the trainer's own sharding code under a fake process
group) for the 7B config."""

import copy
import json

import pytest
import torch

from megamix.cli import main
from megamix.config import ConfigError, load_config, validate
from megamix.model import Transformer
from megamix.parallel.pipeline import RankModel, keep_stage
from megamix.parallel.stages import stages_of_rank
from megamix.plan import built_params_per_rank, params_per_rank
from megamix.schemes import layer_schemes

TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=4",
        "model.num_kv_heads=2", "model.num_layers=8", "model.max_seq_len=64", "data.seq_len=32",
        "train.micro_batch_size=2", "train.global_batch_size=8"]


@pytest.mark.parametrize("overrides, world, field", [
    (["parallel.tp=8"], 8, "parallel.tp"),  # 4 heads
    (["parallel.tp=4"], 4, "parallel.tp"),  # 2 kv heads
    (["parallel.tp=2", "parallel.pp=2"], 6, "parallel.tp"),  # 4 does not divide 6
    (["parallel.tp=2", "parallel.dp=2"], 2, "parallel.dp"),
    (["parallel.tp=2", "model.vocab_size=511"], 2, "parallel.tp"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=31"], 2, "parallel.sequence_parallel"),
    (["parallel.pp=2", "model.tie_embeddings=true"], 2, "model.tie_embeddings"),
    (["parallel.pp=16"], 16, "parallel.pp"),  # 16 stages for 8 layers
    (["parallel.pp=2", "parallel.stage_layers=[3,3]"], 2, "parallel.stage_layers"),
    (["parallel.pp=2", "parallel.stage_layers=[8]"], 2, "parallel.stage_layers"),
    (["parallel.pp=4", "parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2",
      "train.micro_batch_size=4"], 4, "train.global_batch_size"),  # 2 micro-batches for 4 ranks
    (["parallel.pp=2", "parallel.schedule=zero_bubble", "parallel.activation_checkpoint=full"], 2,
     "parallel.activation_checkpoint"),
    (["parallel.pp=2", "parallel.schedule=1f1b", "parallel.virtual_stages=2"], 2, "parallel.virtual_stages"),
    (["train.micro_batch_size=3"], 2, "train.global_batch_size"),
    (["parallel.engine=deepspeed"], 2, "parallel.zero"),  # DeepSpeed runs ZeRO 1-3: zero 0 is fsdp2's
    (["parallel.engine=deepspeed", "parallel.zero=2", "parallel.pp=2"], 2, "parallel.pp"),
    (["parallel.engine=deepspeed", "parallel.zero=1", "parallel.tp=2"], 2, "parallel.tp"),
])
def test_bad_layouts_are_config_errors_naming_the_field(overrides, world, field):
    cfg = load_config(None, TINY + overrides)
    with pytest.raises(ConfigError) as error:
        validate(cfg, world_size=world)
    assert error.value.field == field


def test_a_valid_layout_fills_in_dp():
    cfg = validate(load_config(None, TINY + ["parallel.tp=2", "parallel.pp=2"]), world_size=8)
    assert cfg.parallel.dp == 2


def test_stages_hold_their_global_layers_with_the_placement_alpha_gives():
    cfg = load_config(None, TINY + ["norm.scheme=mix", "norm.alpha=0.25", "parallel.stage_layers=[1,3,4]"])
    expected = layer_schemes(cfg.norm, 8)
    assert expected == ["post", "post"] + ["pre"] * 6
    model = Transformer(cfg.model, cfg.norm)
    held = {}
    for stage in range(3):
        part = keep_stage(copy.deepcopy(model), stage, 3, [1, 3, 4])
        held[stage] = [int(k) for k in part.layers]
        assert all(block.scheme == expected[block.layer_index] for block in part.layers.values())
        assert (part.embed_tokens is not None) == (stage == 0)
        assert (part.lm_head is not None) == (part.norm is not None) == (stage == 2)
    # The two Post-LN layers straddle the first stage boundary and stay Post-LN on both sides.
    assert held == {0: [0], 1: [1, 2, 3], 2: [4, 5, 6, 7]}


@pytest.mark.parametrize("overrides, num_stages", [
    (["norm.scheme=mix", "norm.alpha=0.5"], 4),
    # the embedding's norm and scale live on stage 0 only
    (["norm.scheme=hybrid_star", "norm.embedding_norm=true", "model.embedding_scale=true"], 2),
], ids=["mix", "embedding_norm"])
def test_chained_stages_compute_the_full_model(overrides, num_stages):
    cfg = load_config(None, TINY + overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.norm)
    tokens = torch.randint(0, 512, (2, 16))
    h = tokens
    for stage in range(num_stages):
        part = keep_stage(copy.deepcopy(model), stage, num_stages)
        assert (getattr(part, "embed_norm", None) is not None) == (stage == 0 and cfg.norm.embedding_norm)
        assert (getattr(part, "embed_scale", None) is not None) == (stage == 0 and cfg.model.embedding_scale)
        h = part(h)
    torch.testing.assert_close(h, model(tokens), rtol=0, atol=0)


def test_a_rank_with_virtual_stages_names_parameters_as_the_full_model():
    cfg = load_config(None, TINY)
    model = Transformer(cfg.model, cfg.norm)
    assert stages_of_rank(1, 2, 2) == [1, 3]
    stages = [keep_stage(copy.deepcopy(model), s, 4) for s in stages_of_rank(1, 2, 2)]
    names = dict(RankModel(stages).named_parameters())
    expected = {n for n in dict(model.named_parameters()) if n.split(".")[1] in "2367" or n.startswith(("norm", "lm"))}
    assert set(names) == expected


def test_7b_under_tp4_pp2_builds_on_meta_with_per_rank_counts_summing_to_the_spec():
    cfg = load_config("configs/llama_7b.yaml", ["parallel.tp=4", "parallel.pp=2"])
    validate(cfg, world_size=8)
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.norm)
    built, shapes = built_params_per_rank(cfg, model)
    assert sum(r.owned for r in built.values()) == 6_738_415_616
    # Independent of the build: the Megatron rules applied to the parameter names give the same counts.
    assert built == params_per_rank(cfg, model)
    q, _ = shapes[(1, 3)]["layers.20.attention.q_proj.weight"]
    o, _ = shapes[(1, 3)]["layers.20.attention.o_proj.weight"]
    head, sharded = shapes[(1, 3)]["lm_head.weight"]
    assert q == (1024, 4096) and o == (4096, 1024) and head == (8000, 4096) and sharded
    assert shapes[(0, 0)]["layers.0.attention_norm.weight"] == ((4096,), False)
    assert "lm_head.weight" not in shapes[(0, 0)] and "embed_tokens.weight" not in shapes[(1, 0)]


def test_plan_reports_real_shapes_and_world_size_survey(capsys):
    assert main(["plan", "--config", "configs/llama_7b.yaml", "--set", "parallel.tp=4", "--set", "parallel.pp=2",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sum(r["params_owned"] for r in plan["ranks"]) == 6_738_415_616
    assert plan["ranks"][0]["shapes"]["layers.0.mlp.gate_proj.weight"] == [11008 // 4, 4096]
    assert main(["plan", "--config", "configs/llama_7b.yaml", "--world-size", "8", "--json"]) == 0
    layouts = json.loads(capsys.readouterr().out)
    valid = {(r["tp"], r["pp"], r["dp"]) for r in layouts if r["valid"]}
    assert (4, 2, 1) in valid and (1, 1, 8) in valid and all(tp * pp * dp == 8 for tp, pp, dp in valid)
    assert all(r["memory_gib"]["total"] > 0 for r in layouts if r["valid"])
    # ZeRO-2 over 8 ranks holds an eighth of the fp32 master weights, gradients and Adam moments.
    zero = next(r for r in layouts if (r["tp"], r["pp"], r["dp"]) == (1, 1, 8))
    assert zero["memory_gib"]["optimizer"] == pytest.approx(6_738_415_616 * 8 / 8 / 2**30)


def test_attention_norms_under_tp2_pp2_shard_like_their_projections():
    """A ``full`` QK-norm's weight is split like q and k's columns (and counted so by the plan's
    arithmetic); a per-head one is replicated; the embedding norm lives on the first stage."""
    cfg = load_config(None, TINY + ["model.num_layers=4", "norm.layers=[olmo2,hybrid,peri,hybrid_first]",
                                    "norm.type=dyt", "norm.embedding_norm=true", "parallel.tp=2", "parallel.pp=2"])
    validate(cfg, world_size=4)
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.norm)
    built, shapes = built_params_per_rank(cfg, model)
    assert built == params_per_rank(cfg, model)
    assert sum(r.owned for r in built.values()) == sum(p.numel() for p in model.parameters())
    first = shapes[(0, 1)]
    assert first["layers.0.attention.q_norm.weight"] == ((16,), True)  # full: 32 columns over 2 ranks
    assert first["layers.0.attention.k_norm.bias"] == ((8,), True)
    assert first["layers.0.attention.q_norm.alpha"] == ((1,), False)
    assert first["layers.1.attention.v_norm.weight"] == ((8,), False)  # per head: head_dim, replicated
    assert first["embed_norm.weight"] == ((32,), False) and "embed_norm.weight" not in shapes[(1, 0)]
