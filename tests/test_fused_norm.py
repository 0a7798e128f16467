"""fused_add_norm / norm on CPU: both implementations (the PyTorch path the CPU uses and the
megamix::add_norm_* operators whose CUDA kernels live in csrc/) against the formulas (docs/placements.md) written
out independently here in fp64, gradcheck, torch.compile, and the dispatch switch."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from megamix.ops import fused_norm as fn

KINDS = ["rms", "layer"]
EPS = 1e-6


def formula(x, residual, weight, bias, eps, kind, scale):
    """The formulas: h = x + residual; RMS: h / sqrt(mean(h²) + eps); LayerNorm: (h - μ) / sqrt(σ² + eps)
    with the biased variance; then (· weight + bias) · scale.  fp64 throughout."""
    h = x.double() if residual is None else x.double() + residual.double()
    n = h.shape[-1]
    if kind == "rms":
        centered = h
        var = (h * h).sum(-1, keepdim=True) / n
    else:
        mu = h.sum(-1, keepdim=True) / n
        centered = h - mu
        var = (centered * centered).sum(-1, keepdim=True) / n
    out = centered / torch.sqrt(var + eps) * weight.double()
    if bias is not None:
        out = out + bias.double()
    return out * scale, h


def make(shape, dtype=torch.float64, bias=True, residual=True, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    hidden = shape[-1]

    def t(*s, mean=0.0, std=1.0):
        v = (torch.randn(*s, generator=g, dtype=torch.float64) * std + mean).to(dtype)
        return v.requires_grad_(requires_grad)

    x = t(*shape, mean=0.3)
    r = t(*shape, std=2.0) if residual else None
    w = t(hidden, mean=1.0, std=0.2)
    b = t(hidden, std=0.1) if bias else None
    return x, r, w, b


IMPLS = {"reference": fn.add_norm_reference, "op": fn.add_norm_op}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1 / 3**0.5])
def test_matches_formula_fp64(impl, kind, residual, bias, scale):
    x, r, w, b = make((2, 3, 37), bias=bias, residual=residual)
    y, s = IMPLS[impl](x, r, w, b, EPS, kind, scale)
    want_y, want_s = formula(x, r, w, b, EPS, kind, scale)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    assert y.dtype == s.dtype == torch.float64


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hidden", [1, 7, 64, 1000])
def test_public_functions_and_odd_hidden_sizes(impl, kind, hidden, monkeypatch):
    # fused_add_norm/norm on CPU run the PyTorch path; run the op path through them too.
    if impl == "op":
        monkeypatch.setattr(fn, "add_norm_reference", fn.add_norm_op)
    x, r, w, b = make((5, hidden), dtype=torch.float32)
    y, s = fn.fused_add_norm(x, r, w, b, eps=EPS, kind=kind, scale=0.5)
    want_y, want_s = formula(x, r, w, b, EPS, kind, 0.5)
    torch.testing.assert_close(y, want_y.float(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(s, want_s.float())
    y_norm = fn.norm(x, w, eps=EPS, kind=kind)
    torch.testing.assert_close(y_norm, formula(x, None, w, None, EPS, kind, 1.0)[0].float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_rounds_sum_then_normalizes_in_fp32(impl, dtype, kind):
    x, r, w, b = make((4, 6, 96), dtype=dtype)
    y, s = IMPLS[impl](x, r, w, b, EPS, kind, 0.7)
    assert y.dtype == s.dtype == dtype
    # s is the sum rounded once to the stream dtype; y normalizes that rounded s.
    torch.testing.assert_close(s, (x.double() + r.double()).to(dtype), rtol=0, atol=0)
    want_y = formula(s, None, w, b, EPS, kind, 0.7)[0]
    # half types: the final rounding dominates; fp32: a few ulps of fp32 accumulation
    ulps = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 16}[dtype]
    err = (y.double() - want_y).abs()
    assert (err <= ulps * torch.finfo(dtype).eps * (1 + want_y.abs())).all(), err.max()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("res_dtype", [torch.bfloat16, torch.float32])
def test_residual_stream_in_fp32(impl, res_dtype):
    x, _, w, _ = make((3, 40), dtype=torch.bfloat16, bias=False)
    r = make((3, 40), seed=1)[0].to(res_dtype)
    y, s = IMPLS[impl](x, r, w, None, EPS, "rms", 1.0, residual_in_fp32=True)
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(s, (x.double() + r.double()).float(), rtol=0, atol=0)
    want_y = formula(s, None, w, None, EPS, "rms", 1.0)[0]
    torch.testing.assert_close(y.double(), want_y, rtol=8e-3, atol=8e-3)
    # without the flag, bf16 + fp32 promotes like torch does
    assert IMPLS[impl](x, r, w, None, EPS, "rms", 1.0)[1].dtype == torch.promote_types(x.dtype, res_dtype)
    # residual_in_fp32 without a residual returns x in fp32 as the stream
    assert IMPLS[impl](x, None, w, None, EPS, "rms", 1.0, True)[1].dtype == torch.float32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("residual,bias", [(True, True), (False, False), (True, False)])
def test_gradcheck_fp64(impl, kind, residual, bias):
    x, r, w, b = make((3, 9), residual=residual, bias=bias, requires_grad=True)
    inputs = [t for t in (x, r, w, b) if t is not None]

    def f(*args):
        it = iter(args)
        xx, rr = next(it), next(it) if residual else None
        ww, bb = next(it), next(it) if bias else None
        return IMPLS[impl](xx, rr, ww, bb, EPS, kind, 0.8)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("uses", ["both", "y", "s"])
def test_op_backward_matches_formula(dtype, kind, uses):
    """Incoming gradients of y and s (the next layer's residual) both reach x and residual."""
    x, r, w, b = make((6, 72), dtype=dtype, requires_grad=True)
    y, s = fn.add_norm_op(x, r, w, b, EPS, kind, 0.6)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    ds = torch.randn(s.shape, generator=g).to(dtype)
    outs, grads = {"both": ((y, s), (dy, ds)), "y": ((y,), (dy,)), "s": ((s,), (ds,))}[uses]
    torch.autograd.backward(outs, grads)

    leaves = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
    want_y, want_s = formula(*leaves[:2], *leaves[2:], EPS, kind, 0.6)
    want_outs = {"both": (want_y, want_s), "y": (want_y,), "s": (want_s,)}[uses]
    torch.autograd.backward(want_outs, [gr.double() for gr in grads])
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for got, want in zip((x, r, w, b), leaves):
        if want.grad is None:  # y unused: no gradient reaches weight and bias
            assert got.grad is None
            continue
        assert got.grad.dtype == got.dtype
        atol = tol * want.grad.abs().max().item()
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=tol, atol=atol)


def test_op_handles_non_contiguous_3d_and_empty_inputs():
    x, r, w, _ = make((4, 16, 3))
    xt = x.transpose(0, 2)  # (3, 16, 4), non-contiguous
    rt = r.transpose(0, 2)
    w4 = w.new_ones(4)
    y, s = fn.add_norm_op(xt, rt, w4, None, EPS, "layer", 1.0)
    torch.testing.assert_close(y, formula(xt, rt, w4, None, EPS, "layer", 1.0)[0])
    empty = x.new_empty(0, 8)
    y, s = fn.add_norm_op(empty, empty, x.new_ones(8), None, EPS, "rms", 1.0)
    assert y.shape == s.shape == (0, 8)


def test_op_fake_and_meta_shapes():
    x = torch.empty(2, 5, 24, device="meta", dtype=torch.bfloat16)
    r = torch.empty(2, 5, 24, device="meta", dtype=torch.float32)
    w = torch.empty(24, device="meta")
    y, s, mean, rstd = torch.ops.megamix.add_norm_fwd(x, r, w, None, EPS, False, 1.0, False)
    assert (y.shape, y.dtype, s.dtype, mean.shape, rstd.shape) == (
        x.shape, torch.bfloat16, torch.float32, (10,), (10,))


@pytest.mark.parametrize("residual", [True, False])
def test_opcheck(residual):
    x, r, w, b = make((3, 20), dtype=torch.float32, residual=residual, requires_grad=True)
    torch.library.opcheck(torch.ops.megamix.add_norm_fwd.default, (x, r, w, b, EPS, False, 0.5, False))
    s = (x + r if residual else x).detach()
    rows = s.shape[0]
    args = (torch.randn_like(x), torch.randn_like(s) if residual else None, s, w.detach(),
            s.new_zeros(rows), s.new_ones(rows), False, 0.5, True, torch.float32)
    torch.library.opcheck(torch.ops.megamix.add_norm_bwd.default, args)


def test_compile_fullgraph_op_and_reference_paths():
    x, r, w, b = make((4, 32), dtype=torch.float32, requires_grad=True)

    def block(x, r, w, b):
        y, s = fn.add_norm_op(x, r, w, b, EPS, "rms", 0.5)  # the path CUDA tensors take
        z, _ = fn.fused_add_norm(y, None, w, b, eps=EPS, kind="layer")  # dispatch + PyTorch path
        return (z * s).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    compiled(x, r, w, b).backward()
    got = [t.grad.clone() for t in (x, r, w, b)]
    for t in (x, r, w, b):
        t.grad = None
    block(x, r, w, b).backward()
    for g, t in zip(got, (x, r, w, b)):
        torch.testing.assert_close(g, t.grad)


def test_dispatch_switch_and_logging(monkeypatch, caplog):
    monkeypatch.setattr(fn, "_cuda_kernels", (True, "a stub extension"))
    monkeypatch.setattr(fn, "_logged", set())
    monkeypatch.delenv("MEGAMIX_DISABLE_FUSED", raising=False)
    with caplog.at_level(logging.INFO, logger=fn.__name__):
        assert fn._use_kernels("cuda")
        assert fn._use_kernels("cuda")
        monkeypatch.setenv("MEGAMIX_DISABLE_FUSED", "1")
        assert not fn._use_kernels("cuda")
        assert not fn._use_kernels("cpu")
    messages = [rec.getMessage() for rec in caplog.records]
    assert messages == [
        "fused_norm: CUDA kernels, a stub extension",
        "fused_norm: PyTorch reference path (MEGAMIX_DISABLE_FUSED=1)",
        "fused_norm: PyTorch reference path for cpu tensors",
    ]
    monkeypatch.setattr(fn, "_cuda_kernels", (False, "no CUDA device"))
    monkeypatch.delenv("MEGAMIX_DISABLE_FUSED")
    assert not fn._use_kernels("cuda")


def test_kernels_take_fp32_fp16_bf16_and_an_fp32_residual_stream():
    def t(dtype, shape=(2, 8)):
        return torch.zeros(shape, dtype=dtype)

    bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    assert fn.kernel_supports(t(bf16), t(bf16), t(f32, (8,)), None)
    assert fn.kernel_supports(t(bf16), t(f32), t(bf16, (8,)), t(bf16, (8,)))
    assert fn.kernel_supports(t(f16), None, t(f16, (8,)), None)
    assert not fn.kernel_supports(t(f64), None, t(f64, (8,)), None)  # gradcheck dtype
    assert not fn.kernel_supports(t(bf16), t(f16), t(f32, (8,)), None)  # promotes to fp32
    assert not fn.kernel_supports(t(f32), t(bf16), t(f32, (8,)), None)
    assert not fn._kernels_apply(t(f32), None, t(f32, (8,)), None)  # a CPU tensor


def test_unknown_kind_is_rejected():
    x, r, w, _ = make((3, 24), dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown norm kind"):
        fn.fused_add_norm(x, r, w, kind="batch")


def test_benchmark_cpu_smoke_prints_a_table(capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fused_norm.py"
    spec = importlib.util.spec_from_file_location("fused_norm_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look the module up
    spec.loader.exec_module(bench)
    bench.main(["--cpu-smoke", "--kind", "layer", "--dtype", "bf16"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| layer")]
    assert len(rows) == 4  # 2 hidden sizes x (fwd, fwd+bwd)
    assert all(cell.strip() for row in rows for cell in row.split("|")[1:-1])


def test_the_dispatch_is_marked_constant_for_torch_compile_as_the_public_decorator_marks_it():
    """fused_norm marks its dispatch function by hand, so start-up need not import dynamo; the mark
    must be exactly what ``torch.compiler.assume_constant_result`` sets."""
    def probe(device_type):
        return False

    before = set(vars(probe))
    torch.compiler.assume_constant_result(probe)
    added = {name: getattr(probe, name) for name in set(vars(probe)) - before}
    assert added and all(getattr(fn._use_kernels, name, None) == value for name, value in added.items())


# --- out_dtype: the kernels write y in fp32 from an fp32 stream (Post-LN under bf16 autocast) ---


def test_kernel_writes_output_dtypes():
    bf16, f32 = torch.bfloat16, torch.float32
    x, r32, rb = torch.zeros(2, 8, dtype=bf16), torch.zeros(2, 8, dtype=f32), torch.zeros(2, 8, dtype=bf16)
    assert fn.kernel_writes(x, rb, False, None) and fn.kernel_writes(x, rb, False, bf16)
    assert fn.kernel_writes(x, r32, False, f32)  # the stream is fp32: y in fp32
    assert fn.kernel_writes(x, rb, True, f32)  # residual_in_fp32 makes the stream fp32
    assert not fn.kernel_writes(x, rb, False, f32)  # a bf16 stream
    assert not fn.kernel_writes(x, None, False, f32)  # no residual: the input is x itself
    assert not fn.kernel_writes(x, r32, False, torch.float16)


@pytest.mark.parametrize("kind", KINDS)
def test_op_writes_y_in_fp32_from_the_fp32_stream(kind):
    x, _, w, b = make((4, 6, 40), dtype=torch.bfloat16, residual=False, requires_grad=True)
    r = make((4, 6, 40), seed=1)[0].float().requires_grad_()
    y, s = fn.add_norm_op(x, r, w, b, EPS, kind, 0.5, out_dtype=torch.float32)
    assert y.dtype == s.dtype == torch.float32
    want_y = formula(s.detach(), None, w.detach(), b.detach(), EPS, kind, 0.5)[0]
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)  # fp32, not bf16, accuracy
    g = torch.Generator().manual_seed(4)
    dy, ds = torch.randn(y.shape, generator=g), torch.randn(s.shape, generator=g)
    got = torch.autograd.grad((y, s), (x, r, w, b), (dy, ds))
    ref = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
    ry, rs = fn.add_norm_reference(*ref, EPS, kind, 0.5, False, torch.float32)
    want = torch.autograd.grad((ry, rs), ref, (dy, ds))
    for a, c, leaf in zip(got, want, (x, r, w, b)):
        assert a.dtype == leaf.dtype
        torch.testing.assert_close(a.double(), c.double(), rtol=2e-2, atol=2e-2 * c.abs().max().item())


def test_fused_add_norm_sends_fp32_output_to_the_operator(monkeypatch):
    """With the kernels available, out_dtype=fp32 over an fp32 stream takes the operator path
    (before, any out_dtype other than x's fell back to the PyTorch path)."""
    calls = []
    real = fn.add_norm_op

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(fn, "_kernels_apply", lambda *a: True)
    monkeypatch.setattr(fn, "_use_kernels", lambda device_type: True)
    monkeypatch.setattr(fn, "add_norm_op", spy)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    r, w = torch.randn(3, 16), torch.ones(16)
    y, s = fn.fused_add_norm(x, r, w, out_dtype=torch.float32)
    assert calls and calls[-1][-1] == torch.float32 and y.dtype == torch.float32
    calls.clear()
    fn.fused_add_norm(x, None, w, out_dtype=torch.float32)  # no fp32 stream: PyTorch path
    assert not calls


def test_op_fake_and_opcheck_with_out_dtype():
    x = torch.empty(2, 5, 24, device="meta", dtype=torch.bfloat16)
    r = torch.empty(2, 5, 24, device="meta", dtype=torch.float32)
    w = torch.empty(24, device="meta", dtype=torch.bfloat16)
    y, s, _, _ = torch.ops.megamix.add_norm_fwd(x, r, w, None, EPS, True, 1.0, False, torch.float32)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    xc, rc, wc = make((3, 20), dtype=torch.bfloat16, bias=False, requires_grad=True)[:3]
    rc = rc.float().detach().requires_grad_()
    torch.library.opcheck(torch.ops.megamix.add_norm_fwd.default,
                          (xc, rc, wc, None, EPS, True, 0.5, False, torch.float32))


def test_op_takes_weights_in_their_own_dtype():
    """bf16 weights (FSDP2's compute parameters) give the same y as their fp32 values and get
    gradients in bf16."""
    x, r, w, b = make((5, 32), dtype=torch.bfloat16, requires_grad=True)
    y, _ = fn.add_norm_op(x, r, w, b, EPS, "layer")
    y32, _ = fn.add_norm_op(x, r, w.float(), b.float(), EPS, "layer")
    assert torch.equal(y, y32)
    dw, db = torch.autograd.grad(y.sum(), (w, b))
    assert dw.dtype == db.dtype == torch.bfloat16


# --- benchmarks/fused_norm.py: every implementation differentiated through its own parameters ---


def _load_benchmark(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fused_norm.py"
    spec = importlib.util.spec_from_file_location("fused_norm_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_times_a_module_with_its_own_weight_forward_and_backward(monkeypatch):
    """Liger's modules own their weight: the backward must differentiate that one (it used to ask
    for the benchmark's weight, which the module never uses, and the column stayed empty)."""
    bench = _load_benchmark(monkeypatch)

    class OwnWeight(torch.nn.Module):  # how Liger's LigerFusedAddRMSNorm behaves
        def __init__(self, hidden):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden))

        def forward(self, x, residual):
            s = x + residual
            return torch.nn.functional.rms_norm(s, s.shape[-1:], self.weight, bench.EPS), s

    module = OwnWeight(16)

    def params(weight, bias):
        with torch.no_grad():
            module.weight.copy_(weight)
        return [module.weight]

    impls = {
        "eager": bench.Impl(bench.eager_add_norm_for("rms")),
        "liger": bench.Impl(lambda x, r, w, b: module(x, r), params),
        "the old way": bench.Impl(lambda x, r, w, b: module(x, r)),  # differentiates the unused weight
    }
    case = bench.Case("rms", torch.float32, "same", 16, 8, backward=True)
    results = bench.run_case(case, torch.device("cpu"), bench.Timer(torch.device("cpu"), 0, 1), impls)
    assert isinstance(results["liger"], float) and results["liger"] > 0
    assert results["the old way"] == "RuntimeError"
    assert not torch.equal(module.weight.detach(), torch.ones(16))  # the case's values were copied in


def test_benchmark_cpu_smoke_covers_the_residual_modes_and_writes_json(tmp_path, capsys, monkeypatch):
    import json

    bench = _load_benchmark(monkeypatch)
    out = tmp_path / "bench.json"
    bench.main(["--cpu-smoke", "--kind", "rms", "--dtype", "bf16", "--residual", "none", "same", "fp32",
                "--json", str(out)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| rms")]
    assert len(rows) == 3 * 2 * 2  # residual modes x 2 hidden sizes x (fwd, fwd+bwd)
    assert {row.split("|")[3].strip() for row in rows} == {"none", "same", "fp32"}
    data = json.loads(out.read_text())
    assert data["liger"] == "skipped" and len(data["cases"]) == 12
    assert all(c["megamix_us"] > 0 and c["x_eager"] > 0 for c in data["cases"])
    # bytes the op must move: bf16 x, fp32 stream: x, r, y, s forward; s, dy, ds, dnorm, dx backward
    case = bench.Case("rms", torch.bfloat16, "fp32", 10, 3, backward=True)
    assert case.min_bytes() == 30 * ((2 + 4 + 2 + 4) + (4 + 2 + 4 + 4 + 2))
    assert bench.Case("rms", torch.bfloat16, "none", 10, 3, backward=False).min_bytes() == 30 * 4


@pytest.mark.parametrize("kind", KINDS)
def test_a_norm_over_features_split_across_ranks_equals_the_whole(kind):
    """QK-norm over a column-sharded projection (tensor parallelism): each of 4 simulated ranks
    holds a quarter of the columns and of the weight, and the statistics summed over the ranks
    (here by threads meeting at a barrier) give the one-process norm."""
    import threading

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 2 + 0.5
    weight, bias = torch.rand(16, dtype=torch.float64) + 0.5, torch.randn(16, dtype=torch.float64)
    ranks = 4
    barrier, slots, out = threading.Barrier(ranks), [None] * ranks, [None] * ranks

    def run(rank):
        def reduce_sum(t):
            slots[rank] = t
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total

        columns = slice(rank * 4, rank * 4 + 4)
        out[rank] = fn.norm_split_features(x[..., columns], weight[columns], bias[columns] if kind == "layer" else None,
                                           EPS, kind, 16, reduce_sum)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected, _ = formula(x, None, weight, bias if kind == "layer" else None, EPS, kind, 1.0)
    torch.testing.assert_close(torch.cat(out, -1), expected, rtol=1e-12, atol=1e-12)


def test_dyt_adds_then_applies_gamma_tanh_alpha_plus_beta():
    torch.manual_seed(0)
    x, r = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    w, b = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
    a = torch.tensor([0.7], dtype=torch.float64)
    y, s = fn.add_dyt(x, r, w, b, a, scale=0.5)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, (w * torch.tanh(0.7 * (x + r)) + b) * 0.5, rtol=1e-14, atol=1e-14)
    y, s = fn.add_dyt(x.float(), r, w.float(), None, a.float(), out_dtype=torch.float64)
    assert y.dtype == torch.float64 and s.dtype == torch.float64
