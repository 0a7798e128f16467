"""Layer-effectiveness analysis against independent references: angular distances computed by hand
with math.acos, a layer made into an identity, the model with a layer deleted from its ModuleDict,
gradients taken with torch.autograd.grad, and the trainer's own evaluation."""

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megamix.analysis.angular import AngularDistances
from megamix.analysis.grad_norms import checkpoint_grad_norms
from megamix.analysis.hidden_states import hidden_states, logits
from megamix.analysis.pruning import layer_removal
from megamix.analysis.report import analyze_model
from megamix.config import load_config, validate
from megamix.data.gpt_dataset import build_dataset
from megamix.model import Block, Transformer
from megamix.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(*overrides: str, seed: int = 0) -> Transformer:
    cfg = validate(load_config(None, [
        "model.vocab_size=64", "model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=4",
        "model.num_layers=4", "model.max_seq_len=32", "model.init_std=0.1", "data.seq_len=16", *overrides,
    ]))
    torch.manual_seed(seed)
    return Transformer(cfg.model, cfg.norm).eval()


def token_batches(count: int = 2, batch: int = 3, seq: int = 17, vocab: int = 64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (batch, seq), generator=generator) for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# Angular distance


class AddVector(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = torch.tensor(v)

    def forward(self, residual, pending, cos, sin):  # a block: the stream in and out as (residual, pending)
        return Block.stream(residual, pending) + self.v, None

    stream = staticmethod(Block.stream)


class QuarterTurn(nn.Module):
    """Rotates the first two coordinates by 90°: (a, b) → (−b, a)."""

    def forward(self, residual, pending, cos, sin):
        x = Block.stream(residual, pending)
        return torch.cat([-x[..., 1:2], x[..., 0:1], x[..., 2:]], dim=-1), None

    stream = staticmethod(Block.stream)


def two_layer_model_with_known_states() -> Transformer:
    """Token t embeds as e_t; layer 0 adds (0, 1, 0, 0); layer 1 turns the first plane by 90°."""
    model = tiny_model("model.hidden_size=4", "model.num_heads=1", "model.num_layers=2", "model.vocab_size=3")
    with torch.no_grad():
        model.embed_tokens.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]]))
    model.layers["0"] = AddVector([0.0, 1.0, 0.0, 0.0])
    model.layers["1"] = QuarterTurn()
    return model


def d(u, v):
    """The angular distance by hand."""
    dot = sum(a * b for a, b in zip(u, v))
    return math.acos(dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))) / math.pi


# The states of each token by hand: x0 = e_t, x1 = x0 + (0, 1), x2 = quarter turn of x1.
STATES = {
    0: ([1, 0], [1, 1], [-1, 1]),
    1: ([0, 1], [0, 2], [-2, 0]),
    2: ([1, 1], [1, 2], [-2, 1]),
}


@pytest.mark.parametrize("mode", ["last", "all"])
def test_angular_distance_matches_a_hand_computation_on_a_two_layer_model(mode):
    model = two_layer_model_with_known_states()
    sequences = [[0, 1], [1, 2]]  # fed as two batches of one sequence, to exercise the running mean
    distances = AngularDistances(num_layers=2, tokens=mode)
    for sequence in sequences:
        distances.update(hidden_states(model, torch.tensor([sequence])))

    tokens = [s[-1] for s in sequences] if mode == "last" else [t for s in sequences for t in s]
    by_hand = {(n, start): sum(d(STATES[t][start], STATES[t][start + n]) for t in tokens) / len(tokens)
               for n, start in [(1, 0), (1, 1), (2, 0)]}
    assert distances.per_layer() == pytest.approx([by_hand[1, 0], by_hand[1, 1]], abs=1e-12)
    first, second = distances.blocks()
    assert first == pytest.approx([by_hand[1, 0], by_hand[1, 1]], abs=1e-12)
    assert second == pytest.approx([by_hand[2, 0]], abs=1e-12)
    # The numbers themselves: last tokens 1 and 2 → layer 0 moves only token 2, layer 1 turns both by 90°.
    if mode == "last":
        assert distances.per_layer() == pytest.approx([math.acos(3 / math.sqrt(10)) / math.pi / 2, 0.5])


def test_a_layer_that_passes_its_input_through_has_zero_distance_and_costs_nothing():
    model = tiny_model("norm.scheme=mix", "norm.alpha=0.25")  # layer 0 Post-LN, layers 1-3 Pre-LN
    identity = model.layers["2"]
    with torch.no_grad():  # x + F(N(x)) with F's output projections zero is exactly x
        identity.attention.o_proj.weight.zero_()
        identity.mlp.down_proj.weight.zero_()
    batches = token_batches()
    states = hidden_states(model, batches[0][:, :-1])
    assert torch.equal(states[2], states[3])

    result = analyze_model(model, batches, grad_batches=1)
    distance = result["angular_distance"]["per_layer"]
    increase = [r["loss_increase"] for r in result["layer_removal"]["layers"]]
    assert distance[2] < 1e-7
    assert increase[2] == 0.0
    for other in (0, 1, 3):
        assert distance[other] > 1e-3
        assert abs(increase[other]) > 1e-5
    # Blocks that contain the identity layer measure the same as the block without it.
    one, two = result["angular_distance"]["blocks"][:2]
    assert two[1] == pytest.approx(one[1], abs=1e-7)  # layers 1-2 ≡ layer 1
    assert two[2] == pytest.approx(one[3], abs=1e-7)  # layers 2-3 ≡ layer 3


def test_the_all_token_mean_is_another_reading_than_the_last_token():
    model = tiny_model()
    states = hidden_states(model, token_batches()[0][:, :-1])
    last, every = AngularDistances(4, "last"), AngularDistances(4, "all")
    last.update(states)
    every.update(states)
    assert last.count == 3 and every.count == 3 * 16
    assert last.per_layer() != pytest.approx(every.per_layer(), rel=1e-3)


# ----------------------------------------------------------------------------------------------
# Performance drop and gradient norms


def loss_by_hand(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Token-weighted mean loss of ``model.forward`` over the batches."""
    total = sum(float(F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
                for b in batches)
    return total / sum(b[:, 1:].numel() for b in batches)


@pytest.mark.parametrize("scheme", ["mix", "lns", "deepnorm", "peri"])
def test_the_drop_for_a_layer_matches_the_model_with_that_layer_deleted_by_hand(scheme):
    model = tiny_model(f"norm.scheme={scheme}", "norm.alpha=0.5")
    batches = token_batches()
    with torch.no_grad():
        full = loss_by_hand(model, batches)
        assert torch.equal(logits(model, batches[0][:, :-1]), model(batches[0][:, :-1]))
        removal = layer_removal(model, batches)
        assert removal["loss"] == pytest.approx(full, rel=1e-6)
        for layer in range(4):
            pruned = copy.deepcopy(model)
            del pruned.layers[str(layer)]  # forward iterates over what is left
            without = loss_by_hand(pruned, batches)
            entry = removal["layers"][layer]
            assert entry["layer"] == layer
            assert entry["loss"] == pytest.approx(without, rel=1e-6)
            assert entry["loss_increase"] == pytest.approx(without - full, abs=1e-5)
            assert entry["ppl"] == pytest.approx(math.exp(without), rel=1e-6)


def test_gradient_norms_are_the_mean_over_batches_of_each_layers_gradient_norm():
    model = tiny_model("norm.scheme=post")
    batches = token_batches(count=3)
    per_batch = []
    for b in batches:
        loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        norms = []
        for block in model.layers.values():
            grads = torch.autograd.grad(loss, list(block.parameters()), retain_graph=True)
            norms.append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)))
        per_batch.append(norms)
    result = checkpoint_grad_norms(model, batches)
    for measured, expected in zip(result["per_batch"], per_batch, strict=True):
        assert measured == pytest.approx(expected, rel=1e-5)
    assert result["mean"] == pytest.approx([sum(col) / 3 for col in zip(*per_batch)], rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # leaves the model as it found it


# ----------------------------------------------------------------------------------------------
# The tools


def test_analyze_layers_on_a_trained_checkpoint_with_every_placement(tiny_config, corpus, tmp_path):
    cfg = tiny_config("model.num_layers=5", "norm.layers=[post,deepnorm,pre,lns,peri]", "train.steps=3",
                      "train.tensorboard=false")
    Trainer(cfg).run()
    output = tmp_path / "analysis"
    tool = load_script("tools/analyze_layers.py")
    assert tool.main(["--checkpoint", str(tmp_path / "run"), "--data", corpus[0], "--samples", "12",
                      "--batch-size", "4", "--grad-batches", "2", "--output", str(output)]) == 0

    result = json.loads((output / "layers.json").read_text())
    assert result["step"] == 3 and result["schemes"] == ["post", "deepnorm", "pre", "lns", "peri"]
    assert len(result["angular_distance"]["per_layer"]) == 5
    assert [len(row) for row in result["angular_distance"]["blocks"]] == [5, 4, 3, 2, 1]
    assert len(result["layer_removal"]["layers"]) == 5 and len(result["grad_norm"]["per_batch"]) == 2
    # The full model's loss is the mean cross-entropy of the same 12 sequences, computed here.
    from megamix import load_model

    data = build_dataset(corpus[0], "valid", "0,1", cfg.data.seq_len, 0, use_split=False)
    tokens = torch.stack([data[i] for i in range(12)])
    with torch.no_grad():
        logits = load_model(tmp_path / "run")(tokens[:, :-1])
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert result["layer_removal"]["loss"] == pytest.approx(reference, rel=1e-6)
    for stem in ("angular_distance", "angular_heatmap", "layer_removal", "grad_norms"):
        assert (output / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    assert {"layers/angular_distance", "layers/layer_removal", "layers/grad_norms"} <= set(events.Tags()["images"])


def test_analyze_layers_accepts_a_checkpoint_saved_under_tp2_pp2(tp2_pp2_runs, corpus, tmp_path):
    """The TP2·PP2 checkpoint gives the analysis of the same run trained in one process (parallel
    training reproduces the single-process run to ~1e-6, so the analyses agree closely)."""
    run, single_process = tp2_pp2_runs["mix"]
    reference_run = tmp_path / "single"
    Trainer(load_config(None, single_process + [f"train.output_dir={reference_run}"])).run()
    tool = load_script("tools/analyze_layers.py")
    results = {}
    for name, checkpoint in (("tp2pp2", run), ("single", reference_run)):
        output = tmp_path / f"analysis_{name}"
        assert tool.main(["--checkpoint", str(checkpoint), "--data", corpus[0], "--samples", "8", "--batch-size", "4",
                          "--grad-batches", "1", "--output", str(output), "--no-tensorboard"]) == 0
        results[name] = json.loads((output / "layers.json").read_text())
    got, expected = results["tp2pp2"], results["single"]
    assert got["schemes"] == expected["schemes"] == ["post", "post", "pre", "pre"]
    assert got["angular_distance"]["per_layer"] == pytest.approx(expected["angular_distance"]["per_layer"], rel=1e-4)
    assert got["layer_removal"]["loss"] == pytest.approx(expected["layer_removal"]["loss"], rel=1e-5)
    assert [r["loss"] for r in got["layer_removal"]["layers"]] == pytest.approx(
        [r["loss"] for r in expected["layer_removal"]["layers"]], rel=1e-5)
    assert got["grad_norm"]["mean"] == pytest.approx(expected["grad_norm"]["mean"], rel=1e-4)


def write_run(run_dir: Path, scheme: str, metrics: list[dict], analysis: dict | None = None) -> None:
    cfg = load_config(None, [f"norm.scheme={scheme}", "norm.alpha=0.25", "model.num_layers=2"])
    cfg.save(run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if analysis:
        (run_dir / "analysis").mkdir()
        (run_dir / "analysis" / "layers.json").write_text(json.dumps(analysis))


def table_row(markdown: str, name: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_compare_runs_tabulates_final_metrics_and_per_layer_profiles(tmp_path):
    write_run(tmp_path / "pre", "pre", [
        {"step": 10, "loss": 5.0, "grad_norm/layer_00": 1.0, "grad_norm/layer_01": 3.0},
        {"step": 10, "val_loss": 4.5, "val_ppl": 90.0},
        {"step": 20, "loss": 4.0, "grad_norm/layer_00": 3.0, "grad_norm/layer_01": 5.0},
        {"step": 20, "val_loss": 4.25, "val_ppl": 70.1},
    ], analysis={
        "angular_distance": {"tokens": "last", "per_layer": [0.3, 0.1], "blocks": [[0.3, 0.1], [0.35]]},
        "layer_removal": {"layers": [{"loss_increase": 0.5}, {"loss_increase": -0.01}]},
        "grad_norm": {"mean": [0.2, 0.4]},
    })
    write_run(tmp_path / "mix", "mix", [
        {"step": 20, "loss": 3.9, "grad_norm/layer_00": 2.0, "grad_norm/layer_01": 2.0},
        {"step": 20, "val_loss": float("nan"), "val_ppl": float("nan")},
    ])
    output = tmp_path / "out"
    tool = load_script("tools/compare_runs.py")
    assert tool.main([str(tmp_path / "pre"), str(tmp_path / "mix"), "--output", str(output)]) == 0
    markdown = (output / "comparison.md").read_text()

    pre = table_row(markdown, "pre")
    assert pre[1:7] == ["pre", "pre×2", "20", "4.0000", "4.2500", "70.10"]
    assert pre[7] == "2 → 4"  # per-layer means over the two logged steps: (1+3)/2 and (3+5)/2
    assert pre[8] == "0.33"  # their spread: population std 1 over mean 3
    assert pre[9] == "0.3 → 0.1" and pre[10] == "+0.5 → -0.01"
    mix = table_row(markdown, "mix")
    assert mix[1:3] == ["mix α=0.25", "pre×2"]  # ⌊0.25 · 2⌋ = 0 Post-LN layers
    assert "diverged" in mix[6] and mix[8] == "0.00" and mix[9] == "–"
    assert "## Angular distance per layer (last token of each sequence)" in markdown
    for stem in ("curves", "grad_norms_training", "angular_distance", "angular_heatmaps", "layer_removal"):
        assert (output / f"{stem}.png").is_file()


def test_norm_study_trains_analyzes_and_compares_each_scheme(tiny_config, tmp_path, capsys):
    config_file = tmp_path / "base.yaml"
    tiny_config("train.steps=2", "train.eval_interval=0", "train.tensorboard=false").save(config_file)
    study = load_script("benchmarks/norm_study.py")
    output = tmp_path / "study"
    assert study.main(["--config", str(config_file), "--schemes", "pre", "mix", "--samples", "4",
                       "--output", str(output)]) == 0
    for run in ("pre", "mix_a0.25"):
        result = json.loads((output / run / "analysis" / "layers.json").read_text())
        assert result["step"] == 2
    assert result["schemes"] == ["post", "pre", "pre", "pre"]  # ⌊0.25 · 4⌋ = 1 Post-LN layer
    printed = capsys.readouterr().out
    assert table_row(printed, "pre")[1] == "pre" and table_row(printed, "mix_a0.25")[1] == "mix α=0.25"
    assert printed == (output / "comparison" / "study.md").read_text() + "\n"


def test_norm_study_seeds_and_per_scheme_learning_rates(tiny_config, tmp_path, capsys):
    """``--seeds 2``: two runs per scheme with seeds config+0 and config+1, tabulated as mean ±
    standard deviation; ``--lr post=5e-4`` sets that scheme's peak (and min, in ratio) learning rate;
    the table says what the study is; every scheme megamix has is offered."""
    config_file = tmp_path / "base.yaml"
    tiny_config("train.steps=2", "train.eval_interval=0", "train.tensorboard=false").save(config_file)
    study = load_script("benchmarks/norm_study.py")
    output = tmp_path / "study"
    assert study.main(["--config", str(config_file), "--schemes", "post", "--seeds", "2", "--lr", "post=5e-4",
                       "--samples", "2", "--output", str(output)]) == 0
    configs = [load_config(output / f"post_lr0.0005_s{k}" / "config.yaml") for k in (0, 1)]
    assert [c.train.seed for c in configs] == [42, 43] and configs[1].data.seed == configs[0].data.seed + 1
    assert configs[0].train.lr == 5e-4 and configs[0].train.min_lr == pytest.approx(5e-5)
    printed = capsys.readouterr().out
    row = table_row(printed, "post_lr0.0005")
    assert row[1:4] == ["post", "0.0005", "2"] and row[7] == "0 of 2"
    losses = [json.loads(line)["val_loss"] for k in (0, 1)
              for line in (output / f"post_lr0.0005_s{k}" / "metrics.jsonl").read_text().splitlines()
              if "val_loss" in line]
    mean, spread = (float(x) for x in row[4].split(" ± "))
    assert mean == pytest.approx(sum(losses) / 2, abs=1e-4)
    assert spread == pytest.approx(abs(losses[0] - losses[1]) / 2 ** 0.5, abs=1e-4)  # sample sd of two
    assert "**What this is:**" in printed and "2 seeds" in printed
    # Every scheme megamix has, by default; the tiny default study calls itself a smoke test.
    from megamix.schemes import model_schemes

    assert study.parser().parse_args([]).schemes == list(model_schemes())
    tiny = load_config(study.TINY_CONFIG, study.TINY_STUDY)
    assert "smoke test of early optimization" in study.what_this_is(tiny, True, 1, 6)
    assert "one seed" in study.what_this_is(tiny, True, 1, 6)
    with pytest.raises(SystemExit, match="not a scheme"):
        study.parse_lrs(["nope=1e-3"], ["pre"])
    assert study.parse_lrs(["1e-3", "post=3e-4"], ["pre", "post"]) == {"pre": 1e-3, "post": 3e-4}


def test_seeds_table_gives_mean_and_spread_and_counts_divergence(tmp_path):
    from megamix.analysis.compare import seeds_table
    from megamix.analysis.runs import load_run

    for k, (val, train) in enumerate([(4.0, 4.1), (4.2, 4.3), (math.nan, math.nan)]):
        write_run(tmp_path / f"post_s{k}", "post", [{"step": 5, "loss": train},
                                                     {"step": 5, "val_loss": val, "val_ppl": math.exp(val)}])
    write_run(tmp_path / "pre", "pre", [{"step": 5, "loss": 3.9}, {"step": 5, "val_loss": 3.8, "val_ppl": 44.7}])
    table = seeds_table({"post": [load_run(tmp_path / f"post_s{k}") for k in range(3)],
                         "pre": [load_run(tmp_path / "pre")]})
    post = table_row(table, "post")
    assert post[1:4] == ["post", "0.001", "3"] and post[7] == "1 of 3"
    assert post[4] == "4.1000 ± 0.1414" and post[6] == "4.2000 ± 0.1414"  # over the two finite seeds
    assert table_row(table, "pre")[4] == "3.8000 ± –"
