"""Benchmark fused residual add + norm: megamix's kernels vs torch eager, torch.compile and Liger.

For each kind, dtype, hidden size and row count it times the forward and the forward+backward
(the backward receives gradients of both y and the new residual s, as inside a model) and prints
a markdown table: megamix's time, its achieved bandwidth (the bytes the op must move at least,
over time) as GB/s and as a fraction of the measured device-copy bandwidth, and how many times
faster it is than each baseline (> 1 means megamix wins).

    python benchmarks/fused_norm.py                       # the issue's sweep, on a GPU
    python benchmarks/fused_norm.py --hidden 4096 --dtype bf16 --kind rms
    python benchmarks/fused_norm.py --cpu-smoke           # tiny CPU run that checks the script

Targets (hidden 4096, bf16): forward >= 85 % and forward+backward >= 70 % of copy bandwidth, and
>= 1.0x the best of torch.compile and Liger.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megamix.ops import fused_norm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-6


def eager_add_norm(x, residual, weight, bias, kind: str):
    """What a model does without the fused op: add, then torch's norm."""
    s = x + residual
    if kind == "rms":
        return F.rms_norm(s, s.shape[-1:], weight, EPS), s
    return F.layer_norm(s, s.shape[-1:], weight, bias, EPS), s


def megamix_add_norm(x, residual, weight, bias, kind: str):
    return fused_norm.add_norm_op(x, residual, weight, bias, EPS, kind)


def liger_add_norm_factory(hidden: int, kind: str, device, dtype) -> Callable | None:
    """Liger-Kernel's fused add + RMSNorm (or add + its LayerNorm), when it is installed."""
    try:
        if kind == "rms":
            from liger_kernel.transformers.fused_add_rms_norm import (
                LigerFusedAddRMSNorm,
            )

            module = LigerFusedAddRMSNorm(hidden, eps=EPS).to(device, dtype)
            return lambda x, residual, weight, bias, kind: module(x, residual)
        from liger_kernel.transformers import LigerLayerNorm

        module = LigerLayerNorm(hidden, eps=EPS).to(device, dtype)

        def add_layer_norm(x, residual, weight, bias, kind):
            s = x + residual
            return module(s), s

        return add_layer_norm
    except ImportError:
        return None


class Timer:
    """Mean time per call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / self.iters
        begin = time.perf_counter()
        for _ in range(self.iters):
            fn()
        return (time.perf_counter() - begin) / self.iters


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * nbytes / seconds


@dataclass
class Case:
    kind: str
    dtype: torch.dtype
    hidden: int
    rows: int
    backward: bool

    def min_bytes(self) -> int:
        """Forward: read x, residual; write y, s.  Backward: read s, dy, ds; write the gradient."""
        elems = self.rows * self.hidden
        size = torch.finfo(self.dtype).bits // 8
        return elems * size * (8 if self.backward else 4)


def run_case(case: Case, device: torch.device, timer: Timer, impls: dict[str, Callable]) -> dict:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=case.dtype)

    x, residual = randn(case.rows, case.hidden), randn(case.rows, case.hidden)
    weight = 1 + 0.1 * randn(case.hidden)
    bias = 0.1 * randn(case.hidden) if case.kind == "layer" else None
    leaves = [t for t in (x, residual, weight, bias) if t is not None]
    for t in leaves:
        t.requires_grad_(case.backward)
    dy, ds = randn(case.rows, case.hidden), randn(case.rows, case.hidden)

    results = {}
    reference_y = None
    for name, impl in impls.items():
        if name == "torch.compile":
            torch.compiler.reset()
        def forward(impl=impl):
            return impl(x, residual, weight, bias, case.kind)

        def forward_backward(impl=impl):
            y, s = forward(impl)
            return torch.autograd.grad((y, s), leaves, (dy, ds))

        try:
            with torch.no_grad() if not case.backward else torch.enable_grad():
                y = forward()[0].float()
            results[name] = timer(forward_backward if case.backward else forward)
        except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
            results[name] = f"{type(exc).__name__}"
            continue
        if reference_y is None:
            reference_y = y
        elif name == "megamix":
            results["max|dy|"] = (y - reference_y).abs().max().item()
    return results


def fmt_ratio(baseline, ours) -> str:
    return f"{baseline / ours:.2f}x" if isinstance(baseline, float) and isinstance(ours, float) else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--rows", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--dtype", choices=DTYPES, nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--kind", choices=fused_norm.KINDS, nargs="+", default=["rms", "layer"])
    parser.add_argument("--pass", dest="passes", choices=["fwd", "fwd+bwd"], nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel baseline")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script)")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
        args.hidden, args.rows, args.warmup, args.iters = [64, 100], [32], 1, 2
        args.no_compile = True  # inductor's CPU C++ build is too slow for a smoke test
        args.no_liger = True
        copy_bytes = 1 << 20
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --cpu-smoke")
        device = torch.device("cuda")
        copy_bytes = 1 << 30
        if not fused_norm.load_kernels(distributed_barrier=False):
            print("warning: megamix CUDA kernels unavailable; 'megamix' times the op's fallback")
    timer = Timer(device, args.warmup, args.iters)
    bandwidth = copy_bandwidth(device, timer, copy_bytes)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# fused add + norm on {name}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e9:.3g} GB/s\n")

    header = ["kind", "dtype", "hidden", "rows", "pass", "megamix us", "GB/s", "% copy",
              "x eager", "x compile", "x liger", "max|dy| vs eager"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for kind in args.kind:
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            for hidden in args.hidden:
                impls: dict[str, Callable] = {"eager": eager_add_norm, "megamix": megamix_add_norm}
                if not args.no_compile:
                    impls["torch.compile"] = torch.compile(eager_add_norm, dynamic=False)
                liger = None if args.no_liger else liger_add_norm_factory(hidden, kind, device, dtype)
                if liger is not None:
                    impls["liger"] = liger
                for rows in args.rows:
                    for pass_name in args.passes:
                        case = Case(kind, dtype, hidden, rows, pass_name == "fwd+bwd")
                        r = run_case(case, device, timer, impls)
                        ours = r.get("megamix")
                        achieved = case.min_bytes() / ours if isinstance(ours, float) else None
                        cells = [
                            kind, dtype_name, str(hidden), str(rows), pass_name,
                            f"{ours * 1e6:.1f}" if isinstance(ours, float) else str(ours),
                            f"{achieved / 1e9:.3g}" if achieved else "-",
                            f"{100 * achieved / bandwidth:.0f}%" if achieved else "-",
                            fmt_ratio(r.get("eager"), ours),
                            fmt_ratio(r.get("torch.compile"), ours),
                            fmt_ratio(r.get("liger"), ours),
                            f"{r['max|dy|']:.2g}" if "max|dy|" in r else "-",
                        ]
                        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
