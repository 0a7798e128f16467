"""DeepSpeed as the second ZeRO engine (``parallel.engine: deepspeed``; CPU, gloo, fp32, tiny models).

One ``torchrun`` world of two processes (``tests/dist/deepspeed_cases.py``) trains ZeRO-1, 2 and 3,
with and without CPU offload, each compared with the single-process :class:`Trainer` on the same
config: the loss, the global and per-layer gradient norms of the first steps (1e-5 relative) and
the validation loss.  A ZeRO-3 run is stopped by SIGUSR1 (as Slurm warns a job) and resumed, and
continues the uninterrupted loss curve; its DeepSpeed checkpoint converts to Hugging Face with
matching logits.  The config checks and ``megamix plan`` need no DeepSpeed; the rest skips without it.
"""

import json
import shutil
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import TINY, torchrun, write_corpus

import megamix
from megamix.checkpoint import CheckpointError, latest_checkpoint
from megamix.cli import main as megamix_main
from megamix.config import ConfigError, load_config, validate
from megamix.train.engines.deepspeed import deepspeed_config
from megamix.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
MIX = ["norm.scheme=mix", "norm.alpha=0.5"]
DEEPSPEED = ["parallel.engine=deepspeed"]


# ----------------------------------------------------------------------------------------------
# The config: what DeepSpeed gets, and the layouts it cannot run (no DeepSpeed needed).


def test_deepspeed_config_is_generated_from_ours_with_user_keys_merged_last():
    cfg = validate(load_config(None, TINY + DEEPSPEED + [
        "parallel.zero=3", "parallel.offload=cpu", "train.micro_batch_size=2", "train.grad_clip=1.0",
        "parallel.deepspeed={zero_optimization: {stage3_max_live_parameters: 1000}, comms_logger: {enabled: true}}",
    ]), world_size=2)
    ds = deepspeed_config(cfg)
    batch = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    assert batch == (8, 2, 2)
    assert ds["gradient_clipping"] == 1.0
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_max_live_parameters"] == 1000  # merged into the section
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["offload_param"] == {"device": "cpu"}
    assert ds["comms_logger"] == {"enabled": True}
    zero1 = deepspeed_config(validate(load_config(None, TINY + DEEPSPEED + ["parallel.zero=1", "parallel.offload=cpu"]),
                                      world_size=2))
    assert "offload_param" not in zero1["zero_optimization"]  # only ZeRO-3 partitions parameters


@pytest.mark.parametrize("overrides, field", [
    (DEEPSPEED, "parallel.zero"),  # zero 0 is FSDP2's replicate
    (DEEPSPEED + ["parallel.zero=2", "parallel.pp=2"], "parallel.pp"),
    (DEEPSPEED + ["parallel.zero=1", "parallel.pp=2"], "parallel.pp"),
    (DEEPSPEED + ["parallel.zero=1", "parallel.tp=2"], "parallel.tp"),
    (DEEPSPEED + ["parallel.zero=2", "parallel.offload=nvme", "parallel.offload_path=/nvme"], "parallel.offload"),
    (DEEPSPEED + ["parallel.zero=3", "parallel.offload=nvme"], "parallel.offload_path"),
    (DEEPSPEED + ["parallel.zero=3", "parallel.offload=disk"], "parallel.offload"),
    (DEEPSPEED + ["parallel.zero=2", "parallel.deepspeed={train_batch_size: 64}"],
     "parallel.deepspeed.train_batch_size"),
    (DEEPSPEED + ["parallel.zero=2", "parallel.deepspeed=[1]"], "parallel.deepspeed"),
    (DEEPSPEED + ["parallel.zero=2", "train.async_save=true"], "train.async_save"),
    (DEEPSPEED + ["parallel.zero=2", "train.compile=true"], "train.compile"),
    (["parallel.zero=2", "parallel.offload=cpu"], "parallel.offload"),  # fsdp2 does not offload
    (["parallel.zero=1"], "parallel.zero"),  # ZeRO-1 is DeepSpeed's
])
def test_layouts_deepspeed_cannot_run_are_config_errors_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as error:
        validate(load_config(None, TINY + overrides), world_size=2)
    assert error.value.field == field
    if field in ("parallel.tp", "parallel.pp"):
        assert "fsdp2" in str(error.value)


def test_plan_counts_zero1_sharding_and_offloaded_host_memory(capsys):
    def plan(*overrides):
        args = ["plan", "--config", "configs/llama_7b.yaml", "--json"]
        for o in ("parallel.tp=1", "parallel.pp=1", "parallel.dp=8", *overrides):
            args += ["--set", o]
        assert megamix_main(args) == 0
        return json.loads(capsys.readouterr().out)["ranks"][0]["memory_gib"]

    n = 6_738_415_616
    zero1 = plan(*DEEPSPEED, "parallel.zero=1")
    assert zero1["optimizer"] == pytest.approx(n * 8 / 8 / 2**30)  # Adam's moments sharded over dp
    assert zero1["grads"] == pytest.approx(n * 4 / 2**30)  # gradients whole on every rank
    offloaded = plan(*DEEPSPEED, "parallel.zero=3", "parallel.offload=cpu")
    assert offloaded["optimizer"] == 0 and offloaded["host"] > n * 8 / 8 / 2**30
    assert offloaded["total"] < plan(*DEEPSPEED, "parallel.zero=3")["total"]


# ----------------------------------------------------------------------------------------------
# Two processes under torchrun.


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    write_corpus(root / "corpus")
    return root


def base(data: Path, *extra: str) -> list[str]:
    return TINY + [f"data.path={data / 'corpus'}", "train.micro_batch_size=2", *MIX, *extra]


def case(data: Path, name: str, layout: list[str], model: tuple[str, ...] = (), output: str | None = None,
         **flags) -> dict:
    overrides = base(data, f"train.output_dir={data / 'runs' / (output or name)}", *model, *DEEPSPEED, *layout)
    return {"name": name, "overrides": overrides, "model": list(model), **flags}


RESUME = ["parallel.zero=3"]
FIVE_STEPS = ("train.steps=5",)  # the schedule and the sample order depend on train.steps
CLIPPED = ("train.grad_clip=0.5",)
STATS = ("train.steps=2", "train.stats_interval=1", "train.eval_interval=0", "norm.qk_norm=full",
         "norm.v_norm=per_head")  # the depth statistics, with norms on q, k and v


def cases(data: Path) -> list[dict]:
    return [
        case(data, "zero1", ["parallel.zero=1"], steps=3, save=True),
        case(data, "zero2_clipped", ["parallel.zero=2"], CLIPPED, steps=3),
        case(data, "zero2_z_loss", ["parallel.zero=2"], ("train.z_loss=0.05",), steps=3),
        case(data, "zero3", ["parallel.zero=3"], steps=3),
        case(data, "zero1_offload", ["parallel.zero=1", "parallel.offload=cpu"], steps=3),
        case(data, "zero3_offload", ["parallel.zero=3", "parallel.offload=cpu"], steps=3),
        case(data, "zero3_full_ac", ["parallel.zero=3", "parallel.activation_checkpoint=full"], steps=3),
        case(data, "zero3_stats", ["parallel.zero=3"], STATS, run=True),
        case(data, "full", RESUME, FIVE_STEPS, run=True),
        case(data, "stopped", RESUME, FIVE_STEPS, output="resumed", run=True, signal_at=3),  # SIGUSR1 at 3 ...
        case(data, "resumed", RESUME, FIVE_STEPS, run=True),  # ... requeued: continues from its checkpoint
    ]


@pytest.fixture(scope="module")
def world(data):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not importable (pip install -e .[deepspeed])")
    out = data / "world2"
    out.mkdir()
    specs = cases(data)
    (out / "cases.json").write_text(json.dumps(specs))
    torchrun(2, ROOT / "tests/dist/deepspeed_cases.py", out / "cases.json", out)
    return out, {s["name"]: s for s in specs}


@cache
def reference(data: str, model: tuple[str, ...], steps: int) -> tuple[list[dict], dict, Trainer]:
    """The single-process run (FSDP2's engine, one process): per-step records, validation, model."""
    out = Path(data) / "reference" / f"{abs(hash(model))}_{steps}"
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(load_config(None, base(Path(data), f"train.output_dir={out}", *model)))
    records = [trainer.train_step() for _ in range(steps)]
    return records, trainer.evaluate(), trainer


def assert_same_records(got: list[dict], expected: list[dict]) -> None:
    for ref, rec in zip(expected, got, strict=True):
        assert rec["step"] == ref["step"]
        assert rec["loss"] == pytest.approx(ref["loss"], rel=RTOL), rec["step"]
        assert rec["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), rec["step"]
        layers = [k for k in ref if k.startswith("grad_norm/layer_")]
        assert layers and all(rec[k] == pytest.approx(ref[k], rel=RTOL) for k in layers), rec["step"]
        assert rec.get("z_loss") == (pytest.approx(ref["z_loss"], rel=RTOL) if "z_loss" in ref else None), rec["step"]


def result(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["zero1", "zero2_clipped", "zero2_z_loss", "zero3", "zero1_offload", "zero3_offload",
                                  "zero3_full_ac"])
def test_zero_stage_matches_single_process(data, world, name):
    out, specs = world
    records, evaluation, _ = reference(str(data), tuple(specs[name]["model"]), 3)
    got = result(out, name)
    assert_same_records(got["records"], records)
    assert got["eval"]["val_loss"] == pytest.approx(evaluation["val_loss"], rel=RTOL)
    assert got["eval"]["val_tokens"] == evaluation["val_tokens"]


def test_depth_statistics_under_zero3_equal_one_process(data, world):
    """Every rank runs the probe on the whole model (ZeRO-3 gathers the layers); one counts."""
    def stats(run: Path) -> dict[int, dict]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("stats/")}
                for r in records if any(k.startswith("stats/") for k in r)}

    single = data / "reference" / "stats"
    shutil.rmtree(single, ignore_errors=True)
    Trainer(load_config(None, base(data, f"train.output_dir={single}", *STATS))).run()
    got, want = stats(data / "runs" / "zero3_stats"), stats(single)
    assert sorted(got) == sorted(want) == [1, 2]
    assert any(k.endswith("/attention_q") for k in want[2]) and any(k.endswith("/attention_v") for k in want[2])
    for step, values in want.items():
        assert set(got[step]) == set(values), step
        for key, value in values.items():
            assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-9), (step, key)


def test_gradient_clipping_is_active_in_the_clipped_case(data, world):
    records, _, _ = reference(str(data), CLIPPED, 3)
    assert any(r["grad_norm"] > 0.5 for r in records)  # so the match above covers DeepSpeed's clipping


def test_run_stopped_by_a_signal_resumes_on_the_uninterrupted_loss_curve(data, world):
    out, _ = world
    full = result(out, "full")["records"]
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5]
    assert_same_records(full, reference(str(data), FIVE_STEPS, 5)[0])
    stopped, resumed = result(out, "stopped"), result(out, "resumed")
    assert stopped["preempted_at"] == 3 and "records" not in stopped
    assert resumed["resumed_at"] == 3
    assert [r["step"] for r in resumed["records"]] == [4, 5]
    for rec, expected in zip(resumed["records"], full[3:], strict=True):
        assert rec["loss"] == pytest.approx(expected["loss"], rel=RTOL)
        assert rec["grad_norm"] == pytest.approx(expected["grad_norm"], rel=RTOL)


def test_deepspeed_checkpoints_are_committed_whole(data, world):
    root = data / "runs" / "resumed" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000003", "step_0000005"]  # no .tmp left
    step = root / "step_0000003"
    assert {"deepspeed", "train_state.json", "config.yaml", "latest"} <= {p.name for p in step.iterdir()}
    assert len(list((step / "deepspeed").glob("*_optim_states.pt"))) == 2
    state = json.loads((step / "train_state.json").read_text())
    assert state["step"] == 3 and state["consumed_samples"] == 24 and "rng" in state
    # A half-written save (a .tmp directory, or one without its training state) is never picked up.
    shutil.copytree(step, root.parent.parent / "half" / "checkpoints" / ".tmp_step_0000009")
    shutil.copytree(step, root.parent.parent / "half" / "checkpoints" / "step_0000008")
    (root.parent.parent / "half" / "checkpoints" / "step_0000008" / "train_state.json").unlink()
    shutil.copytree(step, root.parent.parent / "half" / "checkpoints" / "step_0000003")
    assert latest_checkpoint(root.parent.parent / "half").name == "step_0000003"


def test_fsdp2_refuses_to_resume_a_deepspeed_checkpoint_by_name(data, world):
    run = data / "runs" / "fsdp2_on_deepspeed"
    shutil.copytree(data / "runs" / "zero1" / "checkpoints", run / "checkpoints")
    with pytest.raises(CheckpointError, match="parallel.engine: deepspeed"):
        Trainer(load_config(None, base(data, f"train.output_dir={run}")))


@pytest.mark.parametrize("run, model", [("zero1", ()), ("resumed", FIVE_STEPS)])  # ZeRO-1 and ZeRO-3 partitions
def test_load_model_reads_a_deepspeed_checkpoint_as_the_trained_model(data, world, run, model):
    loaded = megamix.load_model(data / "runs" / run)
    trained = reference(str(data), model, 3 if run == "zero1" else 5)[2].engine.model.eval()
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(tokens)
        torch.testing.assert_close(loaded(tokens), expected, rtol=0, atol=RTOL * float(expected.abs().max()))
    assert loaded.schemes == ["post", "post", "pre", "pre"]


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return print, ("unpickled code ran",)


def test_reading_a_deepspeed_checkpoint_never_unpickles_code(data, world, capsys):
    step = data / "runs" / "tampered" / "checkpoints" / "step_0000003"
    shutil.copytree(data / "runs" / "zero1" / "checkpoints" / "step_0000003", step)
    optim = step / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(optim, weights_only=False)  # the test's own, trusted file
    state["extra"] = _RunsCodeWhenUnpickled()
    torch.save(state, optim)
    with pytest.raises(CheckpointError, match="refers to print, which is neither a tensor"):
        megamix.load_model(step)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_deepspeed_checkpoint_converts_to_hugging_face_with_matching_logits(data, world, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_to_hf

    out = tmp_path / "hf"
    assert convert_to_hf.main(["--checkpoint", str(data / "runs" / "resumed"), "--output", str(out),
                               "--dtype", "fp32", "--verify"]) == 0
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True,
                                              local_files_only=True).eval()
    trained = reference(str(data), FIVE_STEPS, 5)[2].engine.model.eval()
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(tokens)
        torch.testing.assert_close(hf(tokens).logits, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


class _TouchesAFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_resuming_a_tampered_deepspeed_checkpoint_never_runs_its_code(tmp_path):
    """One process (DeepSpeed's ZeRO-1 on a world of one, as ZeRO-Offload on a single GPU runs):
    a payload planted in the model-states file is refused on resume, with one line and exit 1."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not importable (pip install -e .[deepspeed])")
    import os
    import subprocess

    write_corpus(tmp_path / "corpus")
    config = tmp_path / "cfg.yaml"
    load_config(None, TINY + [f"data.path={tmp_path / 'corpus'}", f"train.output_dir={tmp_path / 'run'}",
                              "train.steps=2", "train.eval_interval=0", "parallel.engine=deepspeed",
                              "parallel.zero=1"]).save(config)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def train(steps: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "megamix", "train", "--config", str(config), "--set",
                               f"train.steps={steps}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    assert train(2).returncode == 0
    states = latest_checkpoint(tmp_path / "run") / "deepspeed" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "pwned"
    state = torch.load(states, weights_only=False)  # the test's own, trusted file
    state["extra"] = _TouchesAFile(marker)
    torch.save(state, states)
    resumed = train(4)
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert "not unpickled" in resumed.stderr and "Traceback" not in resumed.stderr
    assert not marker.exists()
