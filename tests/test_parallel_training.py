"""Every parallel layout reproduces the single-process run (CPU, gloo, fp32, tiny models).

Each torchrun launch (``tests/dist/run_cases.py``) trains several layouts on one world; every case
is compared with the single-process :class:`Trainer` on the same config: the losses of the first
steps to 1e-5 relative, the gradient of every parameter at the first step to 1e-5 (of the largest
element of that gradient), the global and per-layer gradient norms and the validation loss.
Then a TP2·PP2·DP2 checkpoint (saved asynchronously) resumes on one process and on TP1·PP4, and
both continue the uninterrupted loss curve; ``megamix.load_model`` reads it as one plain model.
"""

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import TINY, free_port, torchrun, write_corpus

import megamix
from megamix.config import load_config
from megamix.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5


def run_cases(nproc: int, cases: list[dict], out: Path) -> Path:
    """Run ``cases`` one after another in one torchrun world of ``nproc`` ranks; results in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "cases.json"
    spec.write_text(json.dumps(cases))
    torchrun(nproc, ROOT / "tests/dist/run_cases.py", spec, out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    write_corpus(root / "corpus")
    return root


def base(data: Path, *extra: str) -> list[str]:
    return TINY + [f"data.path={data / 'corpus'}", "train.micro_batch_size=2", *extra]


def case(name: str, data: Path, model: list[str], layout: list[str], steps: int = 2, **flags) -> dict:
    overrides = base(data, f"train.output_dir={data / 'runs' / name}", *model, *layout)
    return {"name": name, "overrides": overrides, "model": model, "steps": steps, "grads": True, **flags}


@cache
def reference(data: str, model: tuple[str, ...], steps: int) -> tuple[list[dict], dict, dict]:
    """The single-process run: per-step records, first-step gradients, validation loss."""
    out = Path(data) / "reference" / f"{abs(hash(model))}_{steps}"
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(load_config(None, base(Path(data), f"train.output_dir={out}", *model)))
    grads = {}

    def capture(engine):
        if not grads:
            grads.update({n: p.grad.detach().clone() for n, p in engine.model.named_parameters()})

    trainer.engine.before_optimizer_step.append(capture)
    records = [trainer.train_step() for _ in range(steps)]
    return records, grads, trainer.evaluate()


def check_against_reference(data: Path, out: Path, spec: dict) -> None:
    records, grads, evaluation = reference(str(data), tuple(spec["model"]), spec["steps"])
    got = json.loads((out / f"{spec['name']}.json").read_text())
    for ref, rec in zip(records, got["records"], strict=True):
        assert rec["loss"] == pytest.approx(ref["loss"], rel=RTOL), rec["step"]
        assert rec["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), rec["step"]
        layers = [k for k in ref if k.startswith("grad_norm/layer_")]
        assert layers and all(rec[k] == pytest.approx(ref[k], rel=RTOL) for k in layers), rec["step"]
        z_loss = pytest.approx(ref["z_loss"], rel=RTOL) if "z_loss" in ref else None
        assert rec.get("z_loss") == z_loss, rec["step"]
    if spec.get("evaluate"):
        assert got["eval"]["val_loss"] == pytest.approx(evaluation["val_loss"], rel=RTOL)
        assert got["eval"]["val_tokens"] == evaluation["val_tokens"]
    seen = set()
    for file in out.glob(f"{spec['name']}.grads.*.pt"):
        for name, grad in torch.load(file).items():
            expected = grads[name]
            torch.testing.assert_close(grad, expected, rtol=0, atol=RTOL * float(expected.abs().max()), msg=name)
            seen.add(name)
    assert seen == set(grads), "every parameter's gradient lives on some rank"


# ----------------------------------------------------------------------------------------------
# Two processes: TP=2 (every norm scheme, with and without sequence parallelism), PP=2 (every
# schedule), DP=2 (ZeRO 0/2/3), activation checkpointing.

MIX = ["norm.scheme=mix", "norm.alpha=0.5"]
SCHEMES = {
    "pre": ["norm.scheme=pre"], "post": ["norm.scheme=post"], "mix": MIX, "lns": ["norm.scheme=lns"],
    "peri": ["norm.scheme=peri"], "deepnorm": ["norm.scheme=deepnorm"],
}
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2)]
Z_LOSS = ["train.z_loss=0.05"]  # strong enough that a wrong z-loss gradient shows at 1e-5


def two_process_cases(data: Path) -> list[dict]:
    cases = [case(f"dp2_zero{z}", data, MIX, [f"parallel.zero={z}"], steps=3, evaluate=True, probe_zero=True)
             for z in (0, 2, 3)]
    cases.append(case("tp2", data, MIX, ["parallel.tp=2"], steps=3, evaluate=True))
    cases.append(case("tp2_z_loss", data, MIX + Z_LOSS, ["parallel.tp=2"]))  # log Z over the vocabulary shards
    for scheme, model in SCHEMES.items():
        cases.append(case(f"tp2_sp_{scheme}", data, model + ["norm.type=layernorm"],
                          ["parallel.tp=2", "parallel.sequence_parallel=true"]))
    for schedule, virtual in SCHEDULES:
        cases.append(case(f"pp2_{schedule}", data, MIX, ["parallel.pp=2", f"parallel.schedule={schedule}",
                                                         f"parallel.virtual_stages={virtual}"], evaluate=True))
    cases.append(case("tp2_sp_selective_ac", data, MIX, ["parallel.tp=2", "parallel.sequence_parallel=true",
                                                         "parallel.activation_checkpoint=selective"]))
    cases.append(case("dp2_zero3_full_ac", data, MIX, ["parallel.zero=3", "parallel.activation_checkpoint=full"]))
    # train.compile over tensor-parallel blocks whose q and k norms span the ranks (OLMo 2: their
    # statistics are all-reduced inside the graph) and per-head v norms, with and without sequence
    # parallelism; aot_eager traces forward and backward as inductor would, without its C++ build.
    for sp in (False, True):
        cases.append(case("tp2_sp_compiled_attention_norms" if sp else "tp2_compiled_attention_norms", data,
                          ["norm.scheme=olmo2", "norm.v_norm=per_head"],
                          ["parallel.tp=2", f"parallel.sequence_parallel={str(sp).lower()}", "train.compile=true",
                           "train.compile_backend=aot_eager"]))
    return cases


@pytest.fixture(scope="module")
def two_processes(data):
    cases = two_process_cases(data)
    return run_cases(2, cases, data / "world2"), {c["name"]: c for c in cases}


@pytest.mark.parametrize("name", [c["name"] for c in two_process_cases(Path("/"))])
def test_two_process_layout_matches_single_process(data, two_processes, name):
    out, cases = two_processes
    check_against_reference(data, out, cases[name])


def test_zero3_frees_gathered_weights_after_forward_and_zero2_keeps_them(two_processes):
    out, _ = two_processes
    after_forward = {z: json.loads((out / f"dp2_zero{z}.json").read_text())["sharded_after_forward"] for z in (2, 3)}
    assert after_forward[3] and all(after_forward[3])  # back to its dp shard after each forward
    assert after_forward[2] and not any(after_forward[2])  # still the gathered full tensor


# ----------------------------------------------------------------------------------------------
# Four processes: PP=4 (every schedule, 8 layers), TP2·PP2 with sequence parallelism for every
# norm scheme, and two mixed runs of the newer placements and norm types: HybridNorm*'s first
# block, OLMo 2 (QK-norm over the whole projection: statistics summed over the tensor ranks),
# HybridNorm (per-head q, k, v norms) and Peri-LN with its embedding norm on the first stage, under
# sequence parallelism; then DyT in every norm (and a full V-norm) without it, where the gradients
# of the replicated parameters of q, k, v's norms are summed over the tensor ranks in the backward.
# The embedding times a learned scalar, under sequence parallelism (its gradient a partial sum over
# each rank's tokens; Pre-LN, because a norm on the embedding or a Post-LN first layer removes the
# scale and leaves that gradient ~0, rounding noise) and beside DyT's embedding norm.

EIGHT = ["model.num_layers=8"]
NEW_NORMS = {
    "tp2_pp2_sp_new_placements": (["norm.layers=[hybrid_first,olmo2,hybrid,peri]", "norm.embedding_norm=true"],
                                  ["parallel.sequence_parallel=true"]),
    "tp2_pp2_sp_embedding_scale": (["norm.scheme=pre", "model.embedding_scale=true"],
                                   ["parallel.sequence_parallel=true"]),
    "tp2_pp2_dyt": (["norm.type=dyt", "norm.layers=[olmo2,hybrid,post,pre]", "norm.v_norm=full",
                     "norm.embedding_norm=true", "model.embedding_scale=true"], []),
}


def four_process_cases(data: Path) -> list[dict]:
    cases = []
    for schedule, virtual in SCHEDULES:
        cases.append(case(f"pp4_{schedule}", data, EIGHT + MIX, ["parallel.pp=4", f"parallel.schedule={schedule}",
                                                                  f"parallel.virtual_stages={virtual}"]))
    for scheme, model in SCHEMES.items():
        cases.append(case(f"tp2_pp2_{scheme}", data, model, ["parallel.tp=2", "parallel.pp=2",
                                                             "parallel.sequence_parallel=true"],
                          evaluate=scheme == "mix"))
    for name, (model, layout) in NEW_NORMS.items():
        cases.append(case(name, data, model, ["parallel.tp=2", "parallel.pp=2", *layout]))
    # The z-loss on the pipeline's last stage, its logits split over the vocabulary.
    cases.append(case("tp2_pp2_sp_z_loss", data, MIX + Z_LOSS, ["parallel.tp=2", "parallel.pp=2",
                                                                "parallel.sequence_parallel=true"]))
    return cases


@pytest.fixture(scope="module")
def four_processes(data):
    cases = four_process_cases(data)
    return run_cases(4, cases, data / "world4"), {c["name"]: c for c in cases}


@pytest.mark.parametrize("name", [c["name"] for c in four_process_cases(Path("/"))])
def test_four_process_layout_matches_single_process(data, four_processes, name):
    out, cases = four_processes
    check_against_reference(data, out, cases[name])


# ----------------------------------------------------------------------------------------------
# Eight processes: TP2·PP2·DP2, Mix-LN α = 0.25 on 8 layers; its checkpoint on other layouts.

MIX_8 = ["model.num_layers=8", "norm.scheme=mix", "norm.alpha=0.25"]
LAYOUT_3D = ["parallel.tp=2", "parallel.pp=2", "parallel.zero=2", "parallel.sequence_parallel=true",
             "train.async_save=true"]


@pytest.fixture(scope="module")
def three_d(data):
    spec = case("tp2_pp2_dp2", data, MIX_8, LAYOUT_3D, evaluate=True, save=True)
    return run_cases(8, [spec], data / "world8"), spec


def test_tp2_pp2_dp2_mix_ln_matches_single_process(data, three_d):
    out, spec = three_d
    check_against_reference(data, out, spec)


def checkpoint_copy(data: Path, name: str) -> Path:
    """A fresh run directory holding the 3D run's step-2 checkpoint, to resume from."""
    run = data / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(data / "runs" / "tp2_pp2_dp2" / "checkpoints", run / "checkpoints")
    return run


def test_3d_checkpoint_is_committed_whole(data, three_d):
    root = data / "runs" / "tp2_pp2_dp2" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_0000002"]  # no .tmp left behind
    assert {".metadata", "train_state.json", "config.yaml"} <= {p.name for p in (root / "step_0000002").iterdir()}
    assert len(list((root / "step_0000002").glob("*.distcp"))) == 8


def test_3d_checkpoint_resumes_on_one_process_continuing_the_loss_curve(data, three_d):
    uninterrupted, _, _ = reference(str(data), tuple(MIX_8), 4)
    run = checkpoint_copy(data, "resume_1")
    trainer = Trainer(load_config(None, base(data, f"train.output_dir={run}", *MIX_8)))
    assert trainer.step == 2
    for expected in uninterrupted[2:]:
        assert trainer.train_step()["loss"] == pytest.approx(expected["loss"], rel=RTOL)


def test_3d_checkpoint_resumes_on_tp1_pp4_continuing_the_loss_curve(data, three_d):
    uninterrupted, _, _ = reference(str(data), tuple(MIX_8), 4)
    run = checkpoint_copy(data, "resume_pp4")
    overrides = base(data, f"train.output_dir={run}", *MIX_8, "parallel.pp=4")
    out = run_cases(4, [{"name": "resume_pp4", "overrides": overrides, "steps": 2}], data / "world4_resume")
    records = json.loads((out / "resume_pp4.json").read_text())["records"]
    assert [r["step"] for r in records] == [3, 4]
    for rec, expected in zip(records, uninterrupted[2:], strict=True):
        assert rec["loss"] == pytest.approx(expected["loss"], rel=RTOL)


def test_load_model_reads_the_3d_checkpoint_as_one_plain_model(data, three_d):
    model = megamix.load_model(data / "runs" / "tp2_pp2_dp2")
    reference_run = Trainer(load_config(None, base(data, f"train.output_dir={data / 'ref_load'}", *MIX_8)))
    for _ in range(2):
        reference_run.train_step()
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference_run.engine.model.eval()(tokens)
        torch.testing.assert_close(model(tokens), expected, rtol=0, atol=RTOL * float(expected.abs().max()))
    assert model.schemes == ["post", "post"] + ["pre"] * 6


# ----------------------------------------------------------------------------------------------
# The command line under torchrun.


def test_torchrun_megamix_train_logs_the_single_process_losses(data, tmp_path):
    overrides = base(data, *MIX, "train.steps=3", "train.save_interval=0")
    flags = [arg for o in overrides for arg in ("--set", o)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    runs = {}
    for name, launcher in [("single", [sys.executable, "-m", "megamix"]),
                           ("pp2", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                                    f"--master-port={free_port()}", "-m", "megamix"])]:
        extra = ["--set", "parallel.pp=2"] if name == "pp2" else []
        cmd = launcher + ["train", *flags, "--set", f"train.output_dir={tmp_path / name}", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in lines if "loss" in r]
        assert (tmp_path / name / "checkpoints" / "step_0000003" / ".metadata").is_file()
    assert len(runs["pp2"]) == 3
    assert runs["pp2"] == pytest.approx(runs["single"], rel=RTOL)


# ----------------------------------------------------------------------------------------------
# Models too large to build on the host start on the meta device; each rank initializes its shards.


def test_meta_initialized_shards_are_independent_draws_and_replicas_agree(tmp_path):
    torchrun(4, ROOT / "tests/dist/meta_init.py", tmp_path, timeout=300)
    for layout, rows in json.loads((tmp_path / "meta_init.json").read_text()).items():
        replicated_over_dp = layout.endswith("zero0")
        for a in rows:
            random = [n for n, (_, std) in a["params"].items() if std > 0]  # norms start at exactly 1
            assert random, layout
            for b in rows:
                if a is b or a["pp"] != b["pp"]:
                    continue
                same_shard = a["tp"] == b["tp"] and (replicated_over_dp or a["dp"] == b["dp"])
                for name in random:
                    equal = a["params"][name][0] == b["params"][name][0]
                    assert equal == same_shard, (layout, name, a["tp"], a["dp"], b["tp"], b["dp"])
            for name in random:
                assert 0.015 < a["params"][name][1] < 0.025, (layout, name)  # init_std 0.02
        # Stages draw their own numbers: layer 2 (second stage) does not repeat layer 0.
        if layout == "pp2_tp2":
            first = next(r for r in rows if r["pp"] == 0 and r["tp"] == 0)["params"]
            second = next(r for r in rows if r["pp"] == 1 and r["tp"] == 0)["params"]
            assert first["layers.0.attention.q_proj.weight"][0] != second["layers.2.attention.q_proj.weight"][0]
