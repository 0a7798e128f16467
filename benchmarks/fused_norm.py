"""Benchmark fused residual add + norm: megamix's kernels vs torch eager, torch.compile and Liger.

For each kind, dtype, residual mode, hidden size and row count it times the forward and the
forward+backward (the backward receives gradients of y and, with a residual, of the new residual
stream s, as inside a model) and prints a markdown table: megamix's time, its achieved bandwidth
(the bytes the op must move at least, over time) as GB/s and as a fraction of the measured
device-copy bandwidth, and how many times faster it is than each baseline (> 1 means megamix wins).

Residual modes (``--residual``):

- ``none``: ``y = N(x)``, no add (what a Pre-LN layer's first norm runs);
- ``same``: ``s = x + r`` in x's dtype, ``y = N(s)``;
- ``fp32``: x in bf16/fp16, the residual stream r and s in fp32, ``y`` in x's dtype (what the model
  runs under bf16 autocast: the stream stays fp32).

Every implementation is differentiated with respect to the parameters it actually uses: Liger's
modules own their weight (and bias), so those are the leaves of its backward, holding the same
values as the others'.

    python benchmarks/fused_norm.py                       # the full sweep, on a GPU
    python benchmarks/fused_norm.py --reduced --json out.json   # what scripts/gpu_check.sh runs
    python benchmarks/fused_norm.py --hidden 4096 --dtype bf16 --kind rms --residual fp32
    python benchmarks/fused_norm.py --cpu-smoke           # tiny CPU run that checks the script

Targets (hidden 4096, bf16): forward >= 85 % and forward+backward >= 70 % of copy bandwidth, and
>= 1.0x the best of torch.compile and Liger.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megamix.ops import fused_norm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESIDUAL_MODES = ("none", "same", "fp32")
EPS = 1e-6


def stream_of(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """s = x + residual in the stream's dtype (the wider of the two), or x without a residual."""
    if residual is None:
        return x
    return x.to(residual.dtype) + residual if residual.dtype != x.dtype else x + residual


def eager_add_norm(x, residual, weight, bias, kind: str):
    """What a model does without the fused op: add (in the stream's dtype), then torch's norm,
    the output in x's dtype."""
    s = stream_of(x, residual)
    w = weight.to(s.dtype)
    b = bias.to(s.dtype) if bias is not None else None
    if kind == "rms":
        y = F.rms_norm(s, s.shape[-1:], w, EPS)
    else:
        y = F.layer_norm(s, s.shape[-1:], w, b, EPS)
    return y.to(x.dtype), s


def megamix_add_norm(x, residual, weight, bias, kind: str):
    return fused_norm.add_norm_op(x, residual, weight, bias, EPS, kind)


class Impl:
    """An implementation: ``forward(x, residual, weight, bias) -> (y, s)`` and the parameters its
    backward differentiates (``params(weight, bias)``: the benchmark's, or a module's own)."""

    def __init__(self, forward: Callable, params: Callable | None = None):
        self.forward = forward
        self.params = params or (lambda weight, bias: [t for t in (weight, bias) if t is not None])


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def liger_impl(kind: str, hidden: int, residual_mode: str, device, dtype) -> Impl | None:
    """Liger-Kernel's fused add + RMSNorm (same-dtype residual), its RMSNorm/LayerNorm after a
    torch add otherwise.  Its module owns its parameters: ``params`` copies the case's values into
    them and returns them as the leaves of the backward."""
    try:
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
    except ImportError:
        return None
    norm_dtype = torch.float32 if residual_mode == "fp32" else dtype  # what the norm sees
    fused = None
    if kind == "rms" and residual_mode == "same":
        try:
            from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm as fused
        except ImportError:
            fused = None
    if fused is not None:
        module = _make(fused, hidden, in_place=False).to(device, norm_dtype)

        def forward(x, residual, w, b):
            return module(x, residual)
    else:
        if kind == "rms":
            module = _make(LigerRMSNorm, hidden, in_place=False).to(device, norm_dtype)
        else:
            module = _make(LigerLayerNorm, hidden, bias=True).to(device, norm_dtype)  # 0.8 defaults to none

        def forward(x, residual, w, b):
            s = stream_of(x, residual)
            return module(s).to(x.dtype), s

    def params(weight, bias):
        own = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
        with torch.no_grad():
            own[0].copy_(weight)
            if len(own) > 1:
                own[1].copy_(bias if bias is not None else torch.zeros_like(own[1]))
        return own

    return Impl(forward, params)


def _make(cls, hidden: int, **kwargs):
    try:
        return cls(hidden, eps=EPS, **kwargs)
    except TypeError:  # an older Liger without the keyword
        return cls(hidden, eps=EPS)


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
    residual: str  # RESIDUAL_MODES
    hidden: int
    rows: int
    backward: bool

    def min_bytes(self) -> int:
        """The bytes the op must move at least.  Forward: read x (and the residual), write y (and
        s).  Backward: read s (x without residual), dy (and ds), write the input gradient (once in
        the stream's dtype, and in x's where they differ)."""
        x = torch.finfo(self.dtype).bits // 8
        s = 4 if self.residual == "fp32" else x
        if self.residual == "none":
            fwd, bwd = 2 * x, 3 * x
        else:
            fwd = x + s + x + s  # x, r in; y, s out
            bwd = s + x + s + s + (x if s != x else 0)  # s, dy, ds in; dnorm (+ dx) out
        return self.rows * self.hidden * (fwd + (bwd if self.backward else 0))


def run_case(case: Case, device: torch.device, timer: Timer, impls: dict[str, Impl]) -> dict:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=case.dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    x = randn(case.rows, case.hidden)
    residual = None
    if case.residual == "same":
        residual = randn(case.rows, case.hidden)
    elif case.residual == "fp32":
        residual = randn(case.rows, case.hidden, dtype=torch.float32)
    weight = 1 + 0.1 * randn(case.hidden)
    bias = 0.1 * randn(case.hidden) if case.kind == "layer" else None
    dy = randn(case.rows, case.hidden)
    ds = randn(case.rows, case.hidden, dtype=residual.dtype) if residual is not None else None

    results: dict = {}
    reference_y = None
    for name, impl in impls.items():
        if name == "torch.compile":
            torch.compiler.reset()
        inputs = [t for t in (x, residual) if t is not None]
        for t in inputs + [weight] + ([bias] if bias is not None else []):
            t.requires_grad_(case.backward)
        try:
            params = impl.params(weight, bias)
            for p in params:
                p.requires_grad_(case.backward)
            leaves = inputs + params

            def forward(impl=impl):
                return impl.forward(x, residual, weight, bias)

            def forward_backward(impl=impl, leaves=leaves):
                y, s = forward(impl)
                outs, grads = ((y, s), (dy, ds)) if residual is not None else ((y,), (dy,))
                return torch.autograd.grad(outs, leaves, grads)

            with torch.no_grad() if not case.backward else torch.enable_grad():
                y = forward()[0].float()
            if case.backward:  # a baseline whose backward misses a leaf fails here, not silently
                forward_backward()
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


def ratio(baseline, ours) -> float | None:
    return baseline / ours if isinstance(baseline, float) and isinstance(ours, float) else None


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--rows", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--dtype", choices=DTYPES, nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--kind", choices=fused_norm.KINDS, nargs="+", default=["rms", "layer"])
    parser.add_argument("--residual", choices=RESIDUAL_MODES, nargs="+", default=None,
                        help="residual modes (default: all three; 'same' under --cpu-smoke)")
    parser.add_argument("--pass", dest="passes", choices=["fwd", "fwd+bwd"], nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel baseline")
    parser.add_argument("--reduced", action="store_true",
                        help="the gpu_check sweep: hidden 4096, 16384 rows, bf16 RMSNorm, every residual mode")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.reduced:
        args.hidden, args.rows, args.dtype, args.kind = [4096], [16384], ["bf16"], ["rms"]
        args.warmup, args.iters = min(args.warmup, 5), min(args.iters, 20)
    if args.residual is None:
        args.residual = ["same"] if args.cpu_smoke else list(RESIDUAL_MODES)
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
    liger_missing = not args.no_liger and not liger_available()
    timer = Timer(device, args.warmup, args.iters)
    bandwidth = copy_bandwidth(device, timer, copy_bytes)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# fused add + norm on {name}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e9:.3g} GB/s"
          + ("; Liger not installed" if liger_missing else "") + "\n")

    header = ["kind", "dtype", "residual", "hidden", "rows", "pass", "megamix us", "GB/s", "% copy",
              "x eager", "x compile", "x liger", "max|dy| vs eager"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    records = []
    for kind in args.kind:
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            for residual_mode in args.residual:
                if residual_mode == "fp32" and dtype == torch.float32:
                    continue  # the same as 'same'
                for hidden in args.hidden:
                    impls: dict[str, Impl] = {"eager": Impl(eager_add_norm_for(kind)),
                                              "megamix": Impl(megamix_for(kind))}
                    if not args.no_compile:
                        impls["torch.compile"] = Impl(torch.compile(eager_add_norm_for(kind), dynamic=False))
                    for rows in args.rows:
                        for pass_name in args.passes:
                            case = Case(kind, dtype, residual_mode, hidden, rows, pass_name == "fwd+bwd")
                            case_impls = dict(impls)
                            liger = None if args.no_liger else liger_impl(kind, hidden, residual_mode, device, dtype)
                            if liger is not None:
                                case_impls["liger"] = liger
                            r = run_case(case, device, timer, case_impls)
                            ours = r.get("megamix")
                            achieved = case.min_bytes() / ours if isinstance(ours, float) else None
                            record = {
                                **{k: v for k, v in asdict(case).items() if k != "dtype"},
                                "dtype": dtype_name, "pass": pass_name,
                                "megamix_us": ours * 1e6 if isinstance(ours, float) else None,
                                "gb_s": achieved / 1e9 if achieved else None,
                                "copy_fraction": achieved / bandwidth if achieved else None,
                                "x_eager": ratio(r.get("eager"), ours),
                                "x_compile": ratio(r.get("torch.compile"), ours),
                                "x_liger": ratio(r.get("liger"), ours),
                                "errors": {k: v for k, v in r.items() if isinstance(v, str)},
                                "max_abs_dy": r.get("max|dy|"),
                            }
                            records.append(record)
                            cells = [
                                kind, dtype_name, residual_mode, str(hidden), str(rows), pass_name,
                                f"{ours * 1e6:.1f}" if isinstance(ours, float) else str(ours),
                                f"{achieved / 1e9:.3g}" if achieved else "-",
                                f"{100 * achieved / bandwidth:.0f}%" if achieved else "-",
                                fmt_ratio(r.get("eager"), ours),
                                fmt_ratio(r.get("torch.compile"), ours),
                                fmt_ratio(r.get("liger"), ours),
                                f"{r['max|dy|']:.2g}" if "max|dy|" in r else "-",
                            ]
                            print("| " + " | ".join(cells) + " |", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": name, "torch": torch.__version__, "copy_gb_s": bandwidth / 1e9,
            "liger": "missing" if liger_missing else ("skipped" if args.no_liger else "measured"),
            "compile": "skipped" if args.no_compile else "measured", "cases": records,
        }, indent=2))
    return records


def eager_add_norm_for(kind: str) -> Callable:
    def forward(x, residual, weight, bias):
        return eager_add_norm(x, residual, weight, bias, kind)

    return forward


def megamix_for(kind: str) -> Callable:
    def forward(x, residual, weight, bias):
        return megamix_add_norm(x, residual, weight, bias, kind)

    return forward


if __name__ == "__main__":
    main()
