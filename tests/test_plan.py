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
