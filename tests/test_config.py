"""Every bad config fails up front with one clear line naming the field (exit code 2 from the CLI)."""

import subprocess
import sys

import pytest
import yaml

from megamix.cli import main
from megamix.config import ConfigError, load_config, validate

BAD = [
    (["train.z_loss=-1e-4"], "train.z_loss", "must not be negative"),
    (["train.decay_steps=10"], "train.decay_steps", "only lr_schedule: wsd"),
    (["train.decay_shape=1-sqrt"], "train.decay_shape", "only lr_schedule: wsd"),
    (["train.lr_schedule=wsd", "train.decay_shape=cosine"], "train.decay_shape", "must be one of"),
    (["train.lr_schedule=wsd", "train.steps=20", "train.warmup_steps=5", "train.decay_steps=16"],
     "train.decay_steps", "[1, steps - warmup_steps = 15]"),
    (["train.lr_schedule=wsd", "train.decay_steps=0"], "train.decay_steps", "must lie in"),
    (["norm.alpah=0.3"], "norm.alpah", "did you mean 'norm.alpha'"),
    (["modle.hidden_size=64"], "modle", "did you mean 'model'"),
    (["model.hidden_size=big"], "model.hidden_size", "expected an integer"),
    (["train.lr=[1]"], "train.lr", "expected a number"),
    (["train.tensorboard=3"], "train.tensorboard", "true or false"),
    (["norm.scheme=mix", "norm.alpha=1.5"], "norm.alpha", "[0, 1]"),
    (["norm.scheme=mix", "norm.alpha=-0.1"], "norm.alpha", "[0, 1]"),
    (["norm.scheme=mix"], "norm.alpha", "needs alpha"),
    (["norm.scheme=sandwich"], "norm.scheme", "must be one of"),
    (["model.num_heads=3"], "model.num_heads", "do not divide hidden_size"),
    (["model.num_kv_heads=3"], "model.num_kv_heads", "do not divide num_heads"),
    (["parallel.tp=8"], "parallel.tp", "does not divide num_heads"),
    (["norm.layers=[pre, post]"], "norm.layers", "2 entries for 4 layers"),
    (["norm.layers=[pre, post, mix, pre]"], "norm.layers[2]", "must be one of"),
    (["parallel.zero=1"], "parallel.zero", "deepspeed"),
    (["train.global_batch_size=6"], "train.global_batch_size", "multiple of micro_batch_size"),
    (["data.seq_len=4096"], "data.seq_len", "exceeds model.max_seq_len"),
    (["train.min_lr=1.0"], "train.min_lr", "[0, lr"),
    (["norm.scheme=mix", "norm.alpha=0.25", "norm.post_layers=1"], "norm.post_layers", "not both"),
    (["norm.scheme=mix", "norm.post_layers=5"], "norm.post_layers", "[0, num_layers=4]"),
    (["norm.scheme=mix", "norm.post_layers=-1"], "norm.post_layers", "[0, num_layers=4]"),
    (["norm.post_layers=2"], "norm.post_layers", "needs scheme: mix"),
    (["norm.scheme=mix"], "norm.alpha", "or norm.post_layers"),
    (["norm.qk_norm=headwise"], "norm.qk_norm", "must be one of"),
    (["norm.v_norm=qkv"], "norm.v_norm", "must be one of"),
    (["norm.type=tanh"], "norm.type", "must be one of"),
    (["norm.type=dyt", "norm.dyt_alpha_attention=0"], "norm.dyt_alpha_attention", "positive"),
    (["norm.dyt_alpha_other=-0.2"], "norm.dyt_alpha_other", "positive"),
    (["norm.embedding_norm=1"], "norm.embedding_norm", "true or false"),
    (["model.embedding_scale=2"], "model.embedding_scale", "true or false"),
    (["train.compile_backend=tvm"], "train.compile_backend", "must be one of"),
    (["norm.layers=[pre, hybrid_star, pre, pre]"], "norm.layers[1]", "must be one of"),
]

BASE = ["model.hidden_size=64", "model.num_heads=4", "model.num_layers=4", "model.max_seq_len=128",
        "data.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=8"]


@pytest.mark.parametrize("overrides,field,words", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_config_names_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, BASE + overrides))
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")
    assert words in str(err.value)


def test_cli_exits_nonzero_with_one_line_naming_the_field(capsys):
    assert main(["plan", "--set", "norm.scheme=mix", "--set", "norm.alpha=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "norm.alpha" in err[0]


def test_a_world_of_no_processes_is_refused(capsys):
    """`check`/`plan --world-size 0` and WORLD_SIZE=0 are named errors, not a division by zero."""
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, []), world_size=0)
    assert err.value.field == "world_size"
    for command in ("check", "plan"):
        with pytest.raises(SystemExit) as stopped:
            main([command, "--world-size", "0"])
        assert stopped.value.code == 2
        assert "argument --world-size: must be a positive integer; got '0'" in capsys.readouterr().err


def test_yaml_file_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_layer: 4\n")
    with pytest.raises(ConfigError, match=r"model.num_layer: unknown key; did you mean 'model.num_layers'"):
        load_config(path)


def test_scientific_notation_and_overrides_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n  min_lr: 1.0e-5\n")
    cfg = load_config(path, ["train.warmup_steps=7", "norm.layers=[pre, post]", "model.num_layers=2"])
    assert cfg.train.lr == 3e-4 and cfg.train.min_lr == 1e-5 and cfg.train.warmup_steps == 7
    assert cfg.norm.layers == ["pre", "post"]


def test_resolved_config_round_trips(tmp_path):
    cfg = validate(load_config(None, BASE + ["norm.scheme=mix", "norm.alpha=0.25"]))
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["norm"]["alpha"] == 0.25


def test_console_script_module_entry_point_reports_config_errors():
    out = subprocess.run([sys.executable, "-m", "megamix", "plan", "--set", "parallel.tp=3"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "parallel.tp" in out.stderr
