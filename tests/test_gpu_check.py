"""scripts/gpu_check.sh without a GPU: the dry run prints every step's command line, runs the
CPU-sized steps, installs wheels from a .wheels/ folder without touching torch, and writes
gpu_check.json / gpu_check.md with every step present and none failed; the report's target
arithmetic on GPU-shaped results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["build", "tests", "kernel_bench", "train", "memory_7b"]


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_wheel(folder: Path, name: str, version: str = "0.1") -> Path:
    """A minimal pure-Python wheel holding the package `name`."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "PROBE = True\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{name}/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


@pytest.mark.skipif(sys.platform != "linux", reason="bash and coreutils timeout")
def test_dry_run_writes_every_step_and_none_fails(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "gpucheckprobe")
    write_wheel(wheels, "torch", "9.9")  # must never be installed
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), GPU_CHECK_WHEELS_DIR=str(wheels), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()

    assert report["dry_run"] is True
    assert [s["name"] for s in report["steps"]] == STEPS
    for step in report["steps"]:
        assert not step["status"].startswith(("failed", "timeout")), step
        assert step["command"] in proc.stdout and step["command"] in md  # every command line printed
        assert step["dry_command"] and step["rc"] == 0, step  # its CPU-sized form ran and passed
        assert f"| {step['name']} | {step['status']} |" in md
    if report["gpu"] is None:
        assert all(s["status"] == "skipped (no GPU)" for s in report["steps"])
    # what ran on the CPU left its results
    by_name = {s["name"]: s for s in report["steps"]}
    assert by_name["tests"]["result"]["tests"] > 0 and by_name["tests"]["result"]["failures"] == 0
    assert {c["residual"] for c in by_name["kernel_bench"]["result"]["cases"]} == {"none", "same", "fp32"}
    variants = by_name["train"]["result"]["variants"]
    assert variants["megamix fused"]["status"] == "passed" and variants["transformers loop"]["status"] == "passed"
    assert by_name["memory_7b"]["result"]["plan_full_gib"] > 0
    assert len(report["targets"]) == 6 and all(t["met"] is None for t in report["targets"])  # no GPU numbers
    # wheels: installed without dependencies onto the path, torch's never
    assert report["wheels"] == ["gpucheckprobe-0.1-py3-none-any.whl"]
    assert "gpucheckprobe" in report["wheels_site_packages"]
    assert "not installing torch-9.9-py3-none-any.whl" in proc.stderr
    assert report["peers"]["liger_kernel"] in ("found", "missing (skipped)")


def test_targets_from_gpu_results():
    """The report's verdicts on GPU-shaped numbers (no GPU needed to check the arithmetic)."""
    gc = gpu_check_module()

    def case(pass_name, residual, frac, x_compile=1.2, x_liger=None):
        return {"kind": "rms", "dtype": "bf16", "residual": residual, "hidden": 4096, "rows": 16384,
                "pass": pass_name, "copy_fraction": frac, "x_compile": x_compile, "x_liger": x_liger}

    records = {
        "kernel_bench": {"result": {"device": "NVIDIA H200", "liger": "missing", "compile": "measured", "cases": [
            case("fwd", "same", 0.90), case("fwd", "fp32", 0.87), case("fwd+bwd", "same", 0.72),
            case("fwd+bwd", "fp32", 0.65, x_compile=0.9, x_liger=1.5)]}},
        "train": {"result": {"device": "NVIDIA H200", "best_mfu": 0.52, "speedup_vs_plain": 1.25,
                             "best_megamix": "megamix fused + compile"}},
        "memory_7b": {"result": {"measured_over_plan": 1.07, "measured_full_gib": 110.0, "plan_full_gib": 102.8}},
    }
    rows = {t["name"].split(",")[0].split(" (")[0]: t for t in gc.targets(records, dry_run=False)}
    assert rows["forward bandwidth"]["met"] is True and rows["forward bandwidth"]["value"] == pytest.approx(0.87)
    assert rows["forward+backward bandwidth"]["met"] is False  # the fp32 stream's 65 %
    assert rows["vs the best of torch.compile and Liger"]["value"] == pytest.approx(0.9)
    assert rows["llama_1b MFU"]["met"] is True
    assert rows["llama_1b vs the plain transformers loop"]["met"] is False
    assert rows["7B peak memory"]["met"] is True
    md = gc.markdown({"dry_run": False, "started": "now", "host": "h", "gpu": "NVIDIA H200", "torch": "2.11",
                      "python": "3.12", "total_s": 200.0, "peers": {"liger_kernel": "missing (skipped)"},
                      "wheels": [], "steps": [], "targets": gc.targets(records, dry_run=False)})
    assert "**no**" in md and "| llama_1b MFU (best megamix variant) | >= 50% | 52.0% | yes |" in md


def test_step_budget_gives_unused_time_to_later_steps():
    gc = gpu_check_module()
    assert sum(most for _, most in gc.LIMITS.values()) > gc.BUDGET_S  # the budget binds
    assert sum(least for least, _ in gc.LIMITS.values()) < gc.BUDGET_S
    assert gc.BUDGET_S + 10 <= 240  # under 4 minutes with the wheel install and the report
