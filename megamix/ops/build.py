"""Building and loading the CUDA extension in ``csrc/``: ahead of time from ``setup.py``, or JIT.

Either way the library adds CUDA kernels to operators that ``megamix/ops/fused_norm.py`` defines;
without it the ops run their PyTorch implementations.  Nothing here may fail on a machine without
CUDA: ``setup_extensions`` then returns no extensions and ``load_extension`` says why not.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[2] / "csrc"
EXTENSION = "megamix._fused_norm_C"  # the setup.py build, importable as a module
JIT_NAME = "megamix_fused_norm"
SOURCES = ("fused_norm_kernels.cu", "fused_norm_binding.cpp")
DEFAULT_ARCHS = ("80", "90")  # A100, H100/H200; MEGAMIX_CUDA_ARCHS="80;90;100" adds Blackwell
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
CXX_FLAGS = ["-O3"]


def cuda_archs(default: tuple[str, ...] = DEFAULT_ARCHS) -> list[str]:
    """Compute capabilities to build for: ``MEGAMIX_CUDA_ARCHS`` ("80;90", "8.0 9.0") or default."""
    spec = os.environ.get("MEGAMIX_CUDA_ARCHS", "").replace(",", ";").replace(" ", ";")
    archs = [a.replace(".", "") for a in spec.split(";") if a.strip()] or list(default)
    for arch in archs:
        if not arch.rstrip("af").isdigit():
            raise ValueError(f"MEGAMIX_CUDA_ARCHS: {arch!r} is not a compute capability like 90")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch plus PTX of the newest, so newer GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=lambda a: int(a.rstrip("af")))
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def cuda_home() -> Path | None:
    """The CUDA toolkit root: the first of $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and nvcc's
    install that holds both bin/nvcc and the runtime headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for candidate in filter(None, candidates):
        home = Path(candidate)
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime_api.h").is_file():
            return home
    return None


def nvcc_path() -> str | None:
    home = cuda_home()
    return str(home / "bin" / "nvcc") if home else None


def _export_cuda_home() -> None:
    """Point torch's extension builder at the toolkit found here (it reads CUDA_HOME on import and
    otherwise guesses from `which nvcc`, wrong for a wrapper script)."""
    home = cuda_home()
    if home is not None:
        os.environ.setdefault("CUDA_HOME", str(home))


def cuda_toolchain_missing() -> str | None:
    """Why the extension cannot be built here, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if nvcc_path() is None:
        return "no CUDA toolkit with nvcc found (set CUDA_HOME)"
    return None


def _sources() -> list[str]:
    return [str(CSRC / name) for name in SOURCES]


def setup_extensions() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for setup.py; empty where CUDA torch or nvcc is missing."""
    if os.environ.get("MEGAMIX_DISABLE_FUSED") == "1":
        return [], {}
    reason = cuda_toolchain_missing()
    if reason is not None:
        log.warning("megamix: not building the CUDA extension: %s", reason)
        return [], {}
    _export_cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    root = CSRC.parent
    extension = CUDAExtension(
        name=EXTENSION,
        sources=[str(Path(s).relative_to(root)) for s in _sources()],
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + gencode_flags(cuda_archs())},
    )
    return [extension], {"build_ext": BuildExtension}


def _jit_archs() -> list[str]:
    """The visible GPUs' archs (a JIT build only needs those) unless MEGAMIX_CUDA_ARCHS says."""
    if os.environ.get("MEGAMIX_CUDA_ARCHS"):
        return cuda_archs()
    found = {
        "{}{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())
    }
    return sorted(found) or list(DEFAULT_ARCHS)


def jit_load(distributed_barrier: bool = False) -> None:
    """Build (cached in torch's extension dir) and load the library with cpp_extension.load.

    With ``distributed_barrier`` and an initialized process group, rank 0 builds first while the
    others wait, then they load its cached build.  Every rank must call it then, at the same point
    (start-up), or it deadlocks; without it concurrent builders serialize on cpp_extension's lock.
    """
    _export_cuda_home()
    from torch.utils.cpp_extension import load

    dist = torch.distributed
    wait = distributed_barrier and dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if wait else 0
    if wait and rank != 0:
        dist.barrier()
    try:
        load(
            name=JIT_NAME,
            sources=_sources(),
            extra_include_paths=[str(CSRC)],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS + gencode_flags(_jit_archs()),
            is_python_module=False,
            verbose=rank == 0 and log.isEnabledFor(logging.DEBUG),
        )
    finally:
        if wait and rank == 0:
            dist.barrier()


def load_extension(distributed_barrier: bool = False) -> tuple[bool, str]:
    """Load the CUDA kernels: the setup.py build, else a JIT build.  Returns (loaded, how or why not)."""
    try:
        import importlib

        importlib.import_module(EXTENSION)
        return True, "prebuilt extension " + EXTENSION
    except ImportError:
        pass
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    reason = cuda_toolchain_missing()
    if reason is not None:
        return False, f"extension not built and {reason}"
    if os.environ.get("MEGAMIX_JIT", "1") == "0":
        return False, "extension not built and MEGAMIX_JIT=0"
    try:
        jit_load(distributed_barrier)
    except (RuntimeError, OSError, ImportError) as exc:  # the PyTorch path must keep working
        log.warning("megamix: JIT build of the CUDA extension failed: %s", exc)
        return False, f"JIT build failed ({type(exc).__name__})"
    return True, f"JIT-built extension {JIT_NAME} (sm_{', sm_'.join(_jit_archs())})"


# --- `python -m megamix.ops.build`: build for the local GPU and check the kernels (gpu_check) ---


def _build_inplace() -> None:
    """``setup.py build_ext --inplace`` for the local GPU's arch: megamix/_fused_norm_C*.so in
    the checkout (what load_extension imports first).  Needs no ninja, unlike the JIT build."""
    import subprocess
    import sys

    env = dict(os.environ, MEGAMIX_CUDA_ARCHS=os.environ.get("MEGAMIX_CUDA_ARCHS") or ";".join(_jit_archs()))
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=CSRC.parent, env=env, check=True)


def kernels_registered() -> bool:
    """Whether megamix::add_norm_fwd/bwd have CUDA kernels in this process."""
    import megamix.ops.fused_norm  # noqa: F401 - defines the operators

    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"megamix::{op}", "CUDA")
               for op in ("add_norm_fwd", "add_norm_bwd"))


def smoke_test() -> dict:
    """One forward and backward on the GPU (odd hidden size, fp32 stream, bf16 weight) against
    the CPU operator: the largest absolute differences."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(67, 4099, generator=g).to(torch.bfloat16)
    r = torch.randn(67, 4099, generator=g) * 3
    w = (1 + 0.1 * torch.randn(4099, generator=g)).to(torch.bfloat16)
    dy = torch.randn(67, 4099, generator=g).to(torch.bfloat16)
    ds = torch.randn(67, 4099, generator=g)
    out = {}
    for name, rms in (("rms", True), ("layer", False)):
        args = (x, r, w, None, 1e-6, rms, 1.0, False)
        fwd = [torch.ops.megamix.add_norm_fwd(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args]),
               torch.ops.megamix.add_norm_fwd(*args)]
        y_err = (fwd[0][0].cpu().float() - fwd[1][0].float()).abs().max().item()
        s, mean, rstd = fwd[0][1], fwd[0][2], fwd[0][3]
        bargs = (dy, ds, s.cpu(), w, mean.cpu(), rstd.cpu(), rms, 1.0, False, torch.bfloat16)
        got = torch.ops.megamix.add_norm_bwd(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in bargs])
        want = torch.ops.megamix.add_norm_bwd(*bargs)
        dx_err = (got[0].cpu() - want[0]).abs().max().item()
        dw_err = ((got[2].cpu() - want[2]).abs().max() / want[2].abs().max()).item()
        out[name] = {"max_abs_dy": y_err, "max_abs_dx": dx_err, "rel_dweight": dw_err}
    ok = all(v["max_abs_dy"] < 0.1 and v["max_abs_dx"] < 1e-3 and v["rel_dweight"] < 1e-3 for v in out.values())
    return {"ok": ok, **out}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import time
    import traceback

    parser = argparse.ArgumentParser(description="Build the CUDA extension for the local GPU and check that "
                                                 "its kernels load and agree with the CPU operator.")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    result: dict = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "nvcc": nvcc_path()}
    start = time.perf_counter()
    if not torch.cuda.is_available():
        result.update(status="skipped (no GPU)", toolchain=cuda_toolchain_missing() or "ok")
    else:
        result["archs"] = _jit_archs()
        result["gpu"] = torch.cuda.get_device_name()
        try:
            reason = cuda_toolchain_missing()
            if reason is not None:
                raise RuntimeError(reason)
            try:
                import importlib

                importlib.import_module(EXTENSION)
                result["how"] = "prebuilt " + EXTENSION
            except ImportError:
                from torch.utils.cpp_extension import is_ninja_available

                if is_ninja_available():
                    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
                    jit_load()
                    result["how"] = f"JIT build {JIT_NAME}"
                else:
                    _build_inplace()
                    importlib.invalidate_caches()
                    importlib.import_module(EXTENSION)
                    result["how"] = "setup.py build_ext --inplace (no ninja)"
            result["build_s"] = time.perf_counter() - start
            if not kernels_registered():
                raise RuntimeError("the library loaded but megamix::add_norm_fwd/bwd have no CUDA kernel")
            result["smoke"] = smoke_test()
            ok = result["smoke"]["ok"]
            result["status"] = "passed" if ok else "failed (smoke test differs from the CPU operator)"
        except Exception as exc:  # noqa: BLE001 - reported in the JSON, exit status 1
            traceback.print_exc()
            result.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:4000])
    result["seconds"] = time.perf_counter() - start
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    return 0 if result["status"] == "passed" or result["status"].startswith("skipped") else 1


if __name__ == "__main__":
    raise SystemExit(main())
