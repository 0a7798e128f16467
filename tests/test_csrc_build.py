"""The CUDA extension's build without a GPU: nvcc compiles the kernels for sm_80 and sm_90 (no
kernel spills, the backward fits its 64-register launch bound), g++ compiles the binding against
torch's headers, and an install without CUDA still works."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from megamix.ops import build

ROOT = Path(__file__).resolve().parents[1]
NVCC = build.nvcc_path()
CUDA_INCLUDE = build.cuda_home() / "include" if NVCC else None


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """Start both compilations at once (each file once per session) and wait for them."""
    out = tmp_path_factory.mktemp("csrc")
    jobs = {}
    if NVCC:
        archs = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ("80", "90")]
        cmd = [NVCC, "-c", "-O3", *archs, "-Xptxas=-v", f"-I{build.CSRC}",
               str(build.CSRC / "fused_norm_kernels.cu"), "-o", str(out / "kernels.o")]
        jobs["nvcc"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gxx = shutil.which("g++")
    if gxx and CUDA_INCLUDE:
        torch_include = Path(torch.__file__).parent / "include"
        cmd = [gxx, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror",
               # the CPU wheel lacks c10/cuda's generated config header; only Windows needs it
               "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=fused_norm_check",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
               "-isystem", str(torch_include),
               "-isystem", str(torch_include / "torch" / "csrc" / "api" / "include"),
               "-isystem", sysconfig.get_paths()["include"], "-isystem", str(CUDA_INCLUDE),
               f"-I{build.CSRC}", str(build.CSRC / "fused_norm_binding.cpp")]
        jobs["g++"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for name, proc in jobs.items():
        output, _ = proc.communicate(timeout=300)
        results[name] = (proc.returncode, output)
    return results


def ptxas_usage(output: str) -> list[tuple[str, str, int, int]]:
    """(kernel, arch, registers, spill store bytes) per kernel and arch from ``ptxas -v``."""
    usage = []
    for m in re.finditer(r"Compiling entry function '(\w+)' for '(sm_\d+)'\n(.*?)Used (\d+) registers",
                         output, re.DOTALL):
        spill = re.search(r"(\d+) bytes spill stores", m.group(3))
        usage.append((m.group(1), m.group(2), int(m.group(4)), int(spill.group(1)) if spill else 0))
    return usage


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_kernels_compile_for_sm80_and_sm90(compiled):
    rc, output = compiled["nvcc"]
    assert rc == 0, output
    assert "warning" not in output.lower(), output
    usage = ptxas_usage(output)
    assert {arch for _, arch, _, _ in usage} == {"sm_80", "sm_90"}
    fwd = [u for u in usage if "add_norm_fwd_kernel" in u[0]]
    bwd = [u for u in usage if "add_norm_bwd_kernel" in u[0]]
    # per arch: 11 forward dtype combinations (x, residual, stream, y), 7 backward (x, stream, dy)
    # x {RMSNorm, LayerNorm}; all vectorized (the binding re-aligns a misaligned view)
    assert len(fwd) == 2 * 11 and len(bwd) == 2 * 14, usage
    spilling = [u for u in usage if u[3] > 0]
    assert not spilling, f"kernels spill registers: {spilling}"
    # the backward's CTAs of 1024 threads need <= 64 registers (its launch bound)
    assert max(regs for _, _, regs, _ in bwd) <= 64, bwd


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ missing")
def test_layout_header_compiles_as_plain_cpp(tmp_path):
    """fused_norm_layout.h is shared by the kernels and the CPU emulation: it must stay plain C++."""
    src = tmp_path / "layout.cpp"
    src.write_text('#include "fused_norm_layout.h"\n'
                   "int main() { return megamix::layout::row_period(12, 8) == 2 ? 0 : 1; }\n")
    proc = subprocess.run([shutil.which("g++"), "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{build.CSRC}",
                           str(src), "-o", str(tmp_path / "layout")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert subprocess.run([str(tmp_path / "layout")], timeout=30).returncode == 0


@pytest.mark.skipif(shutil.which("g++") is None or NVCC is None, reason="g++ or CUDA headers missing")
def test_binding_compiles_against_torch_headers(compiled):
    rc, output = compiled["g++"]
    assert rc == 0, output


def test_cuda_archs_default_and_override(monkeypatch):
    monkeypatch.delenv("MEGAMIX_CUDA_ARCHS", raising=False)
    assert build.cuda_archs() == ["80", "90"]
    monkeypatch.setenv("MEGAMIX_CUDA_ARCHS", "8.0;9.0, 10.0")
    assert build.cuda_archs() == ["80", "90", "100"]
    assert build.gencode_flags(["80", "90a"]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90a,code=compute_90a",
    ]
    monkeypatch.setenv("MEGAMIX_CUDA_ARCHS", "hopper")
    with pytest.raises(ValueError):
        build.cuda_archs()


def test_no_extension_without_cuda_toolchain(monkeypatch):
    monkeypatch.setattr(build.torch.version, "cuda", None)
    assert build.cuda_toolchain_missing().startswith("torch ")
    assert build.setup_extensions() == ([], {})
    monkeypatch.setattr(build.torch.version, "cuda", "13.0")
    monkeypatch.setattr(build, "nvcc_path", lambda: None)
    assert "nvcc" in build.cuda_toolchain_missing()
    assert build.setup_extensions() == ([], {})


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only install")
def test_setup_py_runs_without_cuda(tmp_path):
    """What `pip install -e .` executes: setup.py with a CPU torch must not try to build csrc/."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "megamix.egg-info").is_dir()


def test_load_extension_reports_why_not_on_cpu(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def without_prebuilt(name, *args):  # a CUDA torch with nvcc may have built it into the checkout
        if name == build.EXTENSION:
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_prebuilt)
    monkeypatch.setattr(build.torch.cuda, "is_available", lambda: False)
    loaded, why = build.load_extension()
    assert not loaded and why == "no CUDA device"
