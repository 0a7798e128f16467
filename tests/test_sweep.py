"""``megamix sweep``: a grid of configs becomes one run per point, every point validated before anything
is written, trained here one after another (``--run``; Slurm's ``--submit``: tests/test_slurm.py),
safe to repeat, extendable, and summarized over seeds.  Each point's config is checked against one
built here from the same overrides, its training against the trainer run directly."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import TINY, write_corpus

from megamix.cli import main
from megamix.config import load_config
from megamix.sweep import parse_grid, point_names
from megamix.train.trainer import Trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny config file whose corpus exists."""
    root = tmp_path_factory.mktemp("sweep")
    write_corpus(root / "corpus")
    path = root / "tiny.yaml"
    load_config(None, TINY + [f"data.path={root / 'corpus'}", "train.steps=2", "train.eval_interval=0"]).save(path)
    return path


def sweep(*args: str) -> int:
    return main(["sweep", *args])


def test_grid_points_are_every_combination_named_by_their_values():
    assert parse_grid("norm.scheme=pre, post") == ("norm.scheme", ["pre", "post"])
    assert parse_grid('norm.layers=["[post, pre]", "[pre, pre]"]') == ("norm.layers", ["[post, pre]", "[pre, pre]"])
    assert parse_grid("train.lr=[1e-3, 2.5, 3]")[1] == ["1e-3", "2.5", "3"]  # as written: --set parses them
    points = point_names([("norm.scheme", ["pre", "mix"]), ("train.seed", ["1", "2"])])
    assert [name for name, _ in points] == ["scheme=pre_seed=1", "scheme=pre_seed=2", "scheme=mix_seed=1",
                                            "scheme=mix_seed=2"]  # the first key varies slowest
    assert points[2][1] == {"norm.scheme": "mix", "train.seed": "1"}
    # Keys that end alike are named in full; values become safe directory names.
    clash = point_names([("train.seed", ["1"]), ("data.seed", ["7"]), ("norm.layers", ["[post, pre]"])])
    assert clash[0][0] == "train.seed=1_data.seed=7_layers=post-pre"
    assert point_names([]) == [("run", {})]
    # --zip keys vary together, as the slowest axis: each scheme with its own learning rate.
    zipped = point_names([("train.seed", ["1", "2"])],
                         [("norm.scheme", ["pre", "post"]), ("train.lr", ["1e-3", "3e-4"])])
    assert [name for name, _ in zipped] == ["scheme=pre_lr=1e-3_seed=1", "scheme=pre_lr=1e-3_seed=2",
                                            "scheme=post_lr=3e-4_seed=1", "scheme=post_lr=3e-4_seed=2"]
    assert zipped[2][1] == {"norm.scheme": "post", "train.lr": "3e-4", "train.seed": "1"}


def test_plan_writes_each_points_resolved_config_and_the_manifest(base, tmp_path, capsys):
    out = tmp_path / "study"
    assert sweep("--out", str(out), "--config", str(base), "--grid", "norm.scheme=pre,mix", "--grid",
                 "train.seed=1,2", "--set", "norm.alpha=0.5") == 0
    printed = capsys.readouterr().out
    assert "| scheme=mix_seed=2 | mix | 2 | post×2 pre×2 |" in printed  # Mix-LN with α 0.5 of 4 layers
    assert "nothing started" in printed
    manifest = json.loads((out / "sweep.json").read_text())
    names = [p["name"] for p in manifest["points"]]
    assert names == ["scheme=pre_seed=1", "scheme=pre_seed=2", "scheme=mix_seed=1", "scheme=mix_seed=2"]
    for point in manifest["points"]:
        run = out.resolve() / "runs" / point["name"]
        want = load_config(base, ["norm.alpha=0.5", f"norm.scheme={point['values']['norm.scheme']}",
                                  f"train.seed={point['values']['train.seed']}", f"train.output_dir={run}"])
        assert Path(point["config"]).read_text() == want.to_yaml()
        assert point["run_dir"] == str(run) and point["jobs"] == []
    assert not (out / "runs").exists()  # planning starts nothing


@pytest.mark.parametrize("args, field", [
    (["--grid", "norm.scheme=pre,bogus"], "norm.scheme"),
    (["--grid", "norm.scheme=pre,mix"], "norm.alpha"),  # mix needs alpha or post_layers
    (["--grid", "model.hidden_sizes=32,64"], "model.hidden_sizes"),
    (["--grid", "train.output_dir=a,b"], "train.output_dir"),
    (["--grid", "train.seed=1,2", "--grid", "train.seed=3"], "train.seed"),
    (["--grid", "train.seed=1,2", "--set", "train.seed=3"], "train.seed"),
    (["--zip", "norm.scheme=pre,post", "--zip", "train.lr=1e-3"], "norm.scheme"),  # zipped lengths differ
    (["--zip", "train.seed=1,2", "--grid", "train.seed=3"], "train.seed"),
    (["--grid", "train.seed=1,,2"], "train.seed"),
    (["--grid", "train.seed=1,1"], "train.seed"),
    (["--grid", "scheme=pre"], "scheme"),
    (["--grid", "train.seed=1", "--world-size", "3"], "train.global_batch_size"),  # 3 ranks: 8 = 4 × dp?
    (["--grid", "train.seed=1", "--set", "data.path=/nonexistent/corpus"], "data.path"),
    (["--grid", "train.seed=1", "--submit", '--sbatch-args="--time=1'], "--sbatch-args"),  # unclosed quote
    (["--grid", "train.seed=1", "--submit", "--script", "/nonexistent/train.sbatch"], "--script"),
])
def test_a_bad_value_in_any_point_is_a_named_error_before_anything_is_written(base, tmp_path, capsys, args, field):
    out = tmp_path / "study"
    assert sweep("--out", str(out), "--config", str(base), *args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megamix: config error: {field}"), err
    assert not out.exists()


def test_zipped_values_share_a_point(base, tmp_path, capsys):
    out = tmp_path / "study"
    assert sweep("--out", str(out), "--config", str(base), "--zip", "norm.scheme=pre,post", "--zip",
                 "train.lr=1e-3,3e-4") == 0
    assert "| scheme=post_lr=3e-4 | post | 3e-4 | post×4 |" in capsys.readouterr().out
    cfg = load_config(out / "configs" / "scheme=post_lr=3e-4.yaml")
    assert (cfg.norm.scheme, cfg.train.lr) == ("post", 3e-4)
    assert json.loads((out / "sweep.json").read_text())["calls"][0]["zip"] == ["norm.scheme=pre,post",
                                                                              "train.lr=1e-3,3e-4"]


def test_an_out_that_is_a_file_or_a_count_below_one_is_refused(base, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert sweep("--out", str(afile), "--config", str(base)) == 2
    assert "config error: --out:" in capsys.readouterr().err and afile.read_text() == "keep me"
    for option in ("--world-size", "--nproc"):
        with pytest.raises(SystemExit) as stopped:
            sweep("--out", str(tmp_path / "study"), "--config", str(base), option, "0")
        assert stopped.value.code == 2 and f"argument {option}: must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def test_run_trains_each_point_then_skips_the_finished_and_extends_the_study(base, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["--out", str(out), "--config", str(base), "--grid", "norm.scheme=pre,post"]
    assert sweep(*args, "--grid", "train.seed=1", "--run") == 0
    printed = capsys.readouterr().out
    for name in ("scheme=pre_seed=1", "scheme=post_seed=1"):
        assert f"| {name} |" in printed and f"== {name}:" in printed
    runs = out.resolve() / "runs"
    # A point trains what the trainer trains on the same config, run directly.
    direct = tmp_path / "direct"
    Trainer(load_config(base, ["norm.scheme=post", "train.seed=1", f"train.output_dir={direct}"])).run()
    got, want = losses(runs / "scheme=post_seed=1"), losses(direct)
    assert sorted(got) == sorted(want) == [1, 2]
    assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want)

    # Again: every point is finished, nothing trains; a second seed adds two points and trains only them.
    assert sweep(*args, "--grid", "train.seed=1", "--run") == 0
    assert "==" not in capsys.readouterr().out
    assert sweep(*args, "--grid", "train.seed=2", "--run") == 0
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("==")] == [
        "== scheme=pre_seed=2", "== scheme=post_seed=2"]
    manifest = json.loads((out / "sweep.json").read_text())
    assert len(manifest["points"]) == 4
    assert [call["grid"] for call in manifest["calls"]] == [["norm.scheme=pre,post", "train.seed=1"],
                                                           ["norm.scheme=pre,post", "train.seed=2"]]

    # The status: every point finished, and the seeds summarized per scheme (formula written here).
    assert sweep("--out", str(out), "--status") == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| scheme=")]
    assert len(rows) == 4 and all(" | 2/2 | " in row and row.endswith(" | finished |") for row in rows)
    for scheme in ("pre", "post"):
        final = [losses(runs / f"scheme={scheme}_seed={s}")[2] for s in (1, 2)]
        ppl = [losses(runs / f"scheme={scheme}_seed={s}", "val_ppl")[2] for s in (1, 2)]  # evaluated at the end
        row = (f"| {scheme} | 2/2 | {statistics.mean(ppl):.2f} ± {statistics.stdev(ppl):.2f} "
               f"| {statistics.mean(final):.4f} ± {statistics.stdev(final):.4f} |")
        assert row in printed, printed

    # A point whose config would change is refused, naming its file; the study stays as it was.
    assert sweep(*args, "--grid", "train.seed=1", "--set", "train.lr=0.5") == 2
    err = capsys.readouterr().err
    assert "scheme=pre_seed=1.yaml holds another config" in err
    assert len(json.loads((out / "sweep.json").read_text())["points"]) == 4

    # --compare draws the study with tools/compare_runs.py's tables and figures.
    assert sweep("--out", str(out), "--status", "--compare") == 0
    assert "scheme=post_seed=2" in (out / "comparison" / "comparison.md").read_text()
    assert (out / "comparison" / "curves.png").stat().st_size > 1000


@pytest.mark.dist
def test_run_with_nproc_trains_each_point_under_torchrun(base, tmp_path, capsys):
    out = tmp_path / "study"
    assert sweep("--out", str(out), "--config", str(base), "--grid", "train.seed=1",
                 "--run", "--nproc", "2") == 0
    assert "torch.distributed.run --standalone --nproc-per-node=2" in capsys.readouterr().out
    run = out / "runs" / "seed=1"
    assert load_config(run / "config.yaml").parallel.dp == 2  # the run's resolved config: two data-parallel ranks
    assert (run / "checkpoints" / "step_0000002" / "train_state.json").is_file()


def test_a_stopped_points_status_quotes_the_error_from_its_slurm_log(tmp_path):
    from megamix.sweep import last_error

    log = tmp_path / "job.out"
    cases = {
        # the trainer's own start line is not an error; the exception after it is
        "megamix-slurm: job 7 attempt 0: 2 ranks\n0: megamix: 4.5M params, 8 layers\n0: step 3 | loss 6.1\n"
        "1: Traceback (most recent call last):\n1: RuntimeError: CUDA out of memory\n"
        "megamix-slurm: first rank to end: rank 1, exit code 1; srun exited with 1\n":
            "RuntimeError: CUDA out of memory",
        "megamix: config error: parallel.tp: tp×pp = 4 does not divide the world size 2\n"
        "megamix-slurm: config check failed for 2 ranks; no rank was started\n":
            "megamix: config error: parallel.tp: tp×pp = 4 does not divide the world size 2",
        # no error line: the batch script's verdict
        "0: megamix: interrupted: saving a checkpoint\nmegamix-slurm: not requeueing: no new checkpoint\n":
            "megamix-slurm: not requeueing: no new checkpoint",
        "megamix-slurm: job 7 attempt 0\n0: megamix: 4.5M params\n0: step 1 | loss 6.2\n": None,
    }
    for text, reason in cases.items():
        log.write_text(text)
        assert last_error(log) == reason, text
    assert last_error(tmp_path / "missing.out") is None
    log.write_text("ValueError: " + "x" * 500 + "\n")
    assert len(last_error(log)) == 200


def test_status_reads_only_the_manifest(base, tmp_path, capsys):
    assert sweep("--out", str(tmp_path / "none"), "--status") == 1
    assert "is not a sweep directory" in capsys.readouterr().err
    out = tmp_path / "study"
    assert sweep("--out", str(out), "--config", str(base), "--grid", "train.seed=1") == 0
    assert sweep("--out", str(out), "--status", "--grid", "train.seed=2") == 1
    assert "--grid belong to planning it" in capsys.readouterr().err
    (out / "sweep.json").write_text("{")
    assert sweep("--out", str(out), "--status") == 1
    assert "sweep.json is not a sweep manifest" in capsys.readouterr().err
