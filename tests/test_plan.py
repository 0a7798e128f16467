"""``megamix plan``: the per-layer placement table and parameter counts, on the meta device."""

import json

from megamix.cli import main


def plan_json(capsys, *args):
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_7b_plan_runs_without_allocating_and_counts_the_spec_parameters(capsys):
    plan = plan_json(capsys, "--config", "configs/llama_7b.yaml")
    assert plan["params_total"] == 6_738_415_616
    assert [row["index"] for row in plan["layers"]] == list(range(32))
    # alpha = 0.0625 on 32 layers: layers 0 and 1 are Post-LN (docs/placements.md, the paper's 7B run)
    assert [row["norm"] for row in plan["layers"]] == ["post"] * 2 + ["pre"] * 30
    assert {row["stage"] for row in plan["layers"]} == {0, 1}


def test_plan_places_mix_layers_by_global_index_across_stages(capsys):
    plan = plan_json(capsys, "--config", "configs/llama_tiny.yaml", "--set", "model.num_layers=8",
                     "--set", "norm.alpha=0.5", "--set", "parallel.pp=4")
    assert [(r["index"], r["norm"], r["stage"]) for r in plan["layers"]] == [
        (0, "post", 0), (1, "post", 0), (2, "post", 1), (3, "post", 1),
        (4, "pre", 2), (5, "pre", 2), (6, "pre", 3), (7, "pre", 3),
    ]


def test_plan_text_lists_every_layer(capsys):
    assert main(["plan", "--config", "configs/llama_71m.yaml"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 70,578,688" in out
    assert sum(1 for line in out.splitlines() if line.strip().split(" ")[0].isdigit() and "post" in line) == 3


def test_plan_prints_the_resolved_post_ln_count_and_the_attention_norms(capsys):
    """``norm.post_layers: 8`` on 24 layers is 8 Post-LN layers (α = 0.33 would give 7); the text says so."""
    args = ["--config", "configs/llama_tiny.yaml", "--set", "model.num_layers=24", "--set", "norm.alpha=null",
            "--set", "norm.post_layers=8"]
    plan = plan_json(capsys, *args)
    assert [row["norm"] for row in plan["layers"]] == ["post"] * 8 + ["pre"] * 16
    assert plan["norm"]["post_ln_layers"] == 8 and plan["norm"]["post_ln_from"] == "post_layers=8"
    assert main(["plan", *args]) == 0
    assert "Mix-LN: 8 of 24 layers Post-LN, from post_layers=8" in capsys.readouterr().out
    plan = plan_json(capsys, "--config", "configs/llama_tiny.yaml", "--set", "norm.scheme=hybrid_star",
                     "--set", "norm.type=dyt", "--set", "norm.embedding_norm=true")
    assert [(r["norm"], r["qk_norm"], r["v_norm"]) for r in plan["layers"]] == (
        [("hybrid_first", "per_head", "per_head")] + [("hybrid", "per_head", "per_head")] * 3)
    assert plan["norm"]["dyt_alpha"] == {"attention": 0.8, "other": 0.2} and plan["norm"]["embedding_norm"]
