"""The CUDA kernels of megamix::add_norm_fwd/bwd against an fp64 computation of the formulas (docs/placements.md).

Tolerance rule (issue 5): the kernel's error is at most twice the error of the same computation
done by PyTorch in the same dtype (the PyTorch path) plus a small atol, forward and backward.
Skipped without a CUDA device; fails (does not skip) when a GPU is there but the kernels do not load.
"""

from __future__ import annotations

import pytest
import torch

from megamix.ops import fused_norm as fn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EPS = 1e-6
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# hidden sizes: tiny, odd (a vector body with scalar head/tail columns that differ row by row),
# not a multiple of 8, the common case, one past 8192 (one window plus a scalar), past the
# backward's window (two windows), past the forward's register cache (16384)
HIDDEN = [7, 64, 1000, 4095, 4096, 8193, 12288, 20480]
RESIDUAL = ["none", "same", "stream_fp32", "residual_fp32"]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if not fn.load_kernels(distributed_barrier=False):
        pytest.fail(f"CUDA kernels did not load: {fn._cuda_kernels}")


def formula(x, residual, weight, bias, kind, scale):
    h = x.double() if residual is None else x.double() + residual.double()
    if kind == "rms":
        centered = h
    else:
        centered = h - h.mean(-1, keepdim=True)
    out = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    if bias is not None:
        out = out + bias.double()
    return out * scale, h


def inputs(rows, hidden, dtype, residual_mode, bias, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, dtype=dtype, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g, device="cuda") * std + mean).to(dtype)

    x = randn(rows, hidden, mean=0.2)
    r = None
    if residual_mode in ("same", "stream_fp32"):
        r = randn(rows, hidden, std=3.0)
    elif residual_mode == "residual_fp32":
        r = randn(rows, hidden, std=3.0, dtype=torch.float32)
    w = randn(hidden, mean=1.0, std=0.2)
    b = randn(hidden, std=0.1) if bias else None
    return x, r, w, b


def errors(outs, wants):
    return [(o.double() - w).abs().max().item() for o, w in zip(outs, wants)]


def check(kernel_err, torch_err, wants, dtype, what):
    for k, t, want, name in zip(kernel_err, torch_err, wants, what):
        atol = 2 * torch.finfo(dtype).eps * want.abs().max().item() + 1e-6
        assert k <= 2 * t + atol, f"{name}: kernel error {k:.3g} > 2 x torch error {t:.3g} + {atol:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("residual_mode", RESIDUAL)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_forward_and_backward_within_twice_torch_error(dtype, kind, residual_mode, hidden):
    bias = kind == "layer"
    scale = 0.5 if residual_mode == "same" else 1.0
    in_fp32 = residual_mode == "stream_fp32"
    x, r, w, b = inputs(257, hidden, dtype, residual_mode, bias)
    leaves = [t for t in (x, r, w, b) if t is not None]
    g = torch.Generator(device="cuda").manual_seed(1)

    results = {}
    for name, impl in (("kernel", fn.add_norm_op), ("torch", fn.add_norm_reference)):
        ls = [t.detach().clone().requires_grad_() for t in leaves]
        it = iter(ls)
        xx, rr = next(it), (next(it) if r is not None else None)
        ww, bb = next(it), (next(it) if b is not None else None)
        y, s = impl(xx, rr, ww, bb, EPS, kind, scale, in_fp32)
        if name == "kernel":
            dy = torch.randn(y.shape, generator=g, device="cuda").to(y.dtype)
            ds = torch.randn(s.shape, generator=g, device="cuda").to(s.dtype)
        outs, grads = ((y, s), (dy, ds)) if r is not None else ((y,), (dy,))
        results[name] = (y, s, torch.autograd.grad(outs, ls, grads))

    exact = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(exact)
    ex, er = next(it), (next(it) if r is not None else None)
    ew, eb = next(it), (next(it) if b is not None else None)
    want_y, want_s = formula(ex, er, ew, eb, kind, scale)
    outs = (want_y, want_s) if r is not None else (want_y,)
    want_grads = torch.autograd.grad(outs, exact, [t.double() for t in grads])

    ky, ks, kgrads = results["kernel"]
    ty, ts, tgrads = results["torch"]
    assert ky.dtype == ty.dtype and ks.dtype == ts.dtype and ks.shape == ts.shape
    assert torch.equal(ks, ts), "the residual stream must be the same rounded sum"
    check(errors([ky], [want_y]), errors([ty], [want_y]), [want_y], dtype, ["y"])
    names = [n for n, t in zip(("dx", "dresidual", "dweight", "dbias"), (x, r, w, b)) if t is not None]
    for kg, leaf in zip(kgrads, leaves):
        assert kg.dtype == leaf.dtype and kg.shape == leaf.shape
    check(errors(kgrads, want_grads), errors(tgrads, want_grads), want_grads, dtype, names)


def test_fused_add_norm_dispatches_to_the_kernel_and_the_switch_disables_it(monkeypatch):
    x, r, w, _ = inputs(8, 256, torch.bfloat16, "same", False)

    def fail(*args, **kwargs):
        raise AssertionError("wrong path")

    monkeypatch.setattr(fn, "add_norm_reference", fail)
    fn.fused_add_norm(x, r, w)
    monkeypatch.undo()
    monkeypatch.setenv("MEGAMIX_DISABLE_FUSED", "1")
    monkeypatch.setattr(fn, "add_norm_op", fail)
    fn.fused_add_norm(x, r, w)


def test_misaligned_and_non_contiguous_inputs_are_realigned():
    rows, hidden = 33, 512
    flat = torch.randn(rows * hidden + 1, device="cuda", dtype=torch.bfloat16)
    x = flat[1:].view(rows, hidden)  # 2-byte offset: copied to an aligned buffer by the binding
    r = torch.randn(hidden, rows, device="cuda", dtype=torch.bfloat16).t()  # non-contiguous
    w = torch.rand(hidden, device="cuda") + 0.5
    y, s = fn.add_norm_op(x, r, w, None, EPS, "rms")
    want_y = formula(s, None, w, None, "rms", 1.0)[0]
    assert (y.double() - want_y).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * want_y.abs().max()


def cpu_op(op, *args):
    """The same operator on CPU copies: its CPU implementation is the formulas in fp32."""
    moved = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    return op(*moved)


def assert_matches_cpu(got, want, dtype, what):
    for name, g, w in zip(what, got, want):
        if w.numel() == 0:
            assert g.numel() == 0, name
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        tol = 4 * torch.finfo(dtype).eps * max(1.0, w.double().abs().max().item())
        err = (g.cpu().double() - w.double()).abs().max().item()
        assert err <= tol, f"{name}: {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("hidden", [7, 4095, 4096, 8193])
def test_odd_sizes_and_misaligned_views_against_the_cpu_operator(offset, hidden):
    """Every row array through a view starting `offset` elements into its buffer (a phase the
    binding re-aligns), odd hidden sizes (each row class its own head/tail split), 1031 rows (CTAs
    of several row groups): forward and backward equal the CPU operator's."""
    rows = 1031
    g = torch.Generator(device="cuda").manual_seed(offset + hidden)

    def view(*shape, dtype=torch.bfloat16, std=1.0):
        n = torch.Size(shape).numel()
        flat = torch.randn(n + offset, generator=g, device="cuda").mul_(std).to(dtype)
        return flat[offset:].view(*shape)

    x, r = view(rows, hidden), view(rows, hidden, dtype=torch.float32, std=3.0)
    w = (1 + 0.2 * torch.randn(hidden, generator=g, device="cuda")).to(torch.bfloat16)  # bf16 weight
    b = (0.1 * torch.randn(hidden, generator=g, device="cuda")).to(torch.bfloat16)
    for rms in (True, False):
        bias = None if rms else b
        args = (x, r, w, bias, EPS, rms, 0.5, True, None)
        got = torch.ops.megamix.add_norm_fwd(*args)
        want = cpu_op(torch.ops.megamix.add_norm_fwd, *args)
        assert_matches_cpu(got[:2], want[:2], torch.bfloat16, ["y", "s"])
        s, mean, rstd = got[1], got[2], got[3]
        dy, ds = view(rows, hidden), view(rows, hidden, dtype=torch.float32)
        bargs = (dy, ds, s, w, mean, rstd, rms, 0.5, bias is not None, torch.bfloat16)
        got_b = torch.ops.megamix.add_norm_bwd(*bargs)
        want_b = cpu_op(torch.ops.megamix.add_norm_bwd, *bargs)
        assert_matches_cpu(got_b, want_b, torch.bfloat16, ["dnorm", "dx", "dweight", "dbias"])


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_weights_in_their_own_dtype(w_dtype, kind):
    """FSDP2's bf16 (or fp16) compute parameters are read as they are: same results as the same
    parameters in fp32, and the weight/bias gradients come back in the parameters' dtype."""
    x, r, _, _ = inputs(300, 2048, torch.bfloat16, "stream_fp32", False)
    w = (1 + 0.2 * torch.randn(2048, device="cuda")).to(w_dtype)
    b = (0.1 * torch.randn(2048, device="cuda")).to(w_dtype) if kind == "layer" else None
    leaves = [t.detach().requires_grad_() for t in (x, r, w) + ((b,) if b is not None else ())]
    y, s = fn.add_norm_op(leaves[0], leaves[1], leaves[2], leaves[3] if b is not None else None, EPS, kind, 1.0, True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad((y, s), leaves, (dy, torch.randn_like(s)))
    assert grads[2].dtype == w_dtype and (b is None or grads[3].dtype == w_dtype)
    w32 = w.float()
    b32 = b.float() if b is not None else None
    y32, _ = fn.add_norm_op(x, r, w32, b32, EPS, kind, 1.0, True)
    assert torch.equal(y, y32), "the kernel converts bf16/fp16 parameters exactly"


def test_post_ln_output_in_fp32_takes_the_kernel(monkeypatch):
    """A Post-LN norm under bf16 autocast: branch bf16, stream fp32, y written in fp32 by the
    kernel (out_dtype), dy arriving in fp32 in the backward; within twice torch's error."""
    x, r, w, _ = inputs(257, 4096, torch.bfloat16, "residual_fp32", False)
    calls = []
    real = fn.add_norm_op

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(fn, "add_norm_op", spy)
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w)]
    y, s = fn.fused_add_norm(*leaves, eps=EPS, out_dtype=torch.float32)
    assert calls, "the fp32 output must take the kernel"
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    g = torch.Generator(device="cuda").manual_seed(2)
    dy = torch.randn(y.shape, generator=g, device="cuda")
    ds = torch.randn(s.shape, generator=g, device="cuda")
    kgrads = torch.autograd.grad((y, s), leaves, (dy, ds))
    ref = [t.detach().clone().requires_grad_() for t in (x, r, w)]
    ty, ts = fn.add_norm_reference(*ref, None, EPS, "rms", 1.0, False, torch.float32)
    tgrads = torch.autograd.grad((ty, ts), ref, (dy, ds))
    exact = [t.detach().double().requires_grad_() for t in (x, r, w)]
    want_y, want_s = formula(exact[0], exact[1], exact[2], None, "rms", 1.0)
    want_grads = torch.autograd.grad((want_y, want_s), exact, (dy.double(), ds.double()))
    check(errors([y], [want_y]), errors([ty], [want_y]), [want_y], torch.float32, ["y"])
    check(errors(kgrads, want_grads), errors(tgrads, want_grads), want_grads, torch.bfloat16,
          ["dx", "dresidual", "dweight"])


@pytest.mark.parametrize("hidden", [4096, 4095, 12288])
def test_weight_gradients_are_deterministic(hidden):
    x, r, w, b = inputs(3000, hidden, torch.bfloat16, "same", True)
    leaves = [t.requires_grad_() for t in (x, r, w, b)]
    dy = torch.randn_like(x)
    first = torch.autograd.grad(fn.add_norm_op(x, r, w, b, EPS, "layer")[0], leaves, dy)
    second = torch.autograd.grad(fn.add_norm_op(x, r, w, b, EPS, "layer")[0], leaves, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_empty_rows():
    x = torch.empty(0, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(4096, device="cuda", requires_grad=True)
    y, s = fn.add_norm_op(x, x, w, None, EPS, "rms")
    (dw,) = torch.autograd.grad(y, [w], torch.empty_like(y))
    assert y.shape == s.shape == (0, 4096) and torch.equal(dw, torch.zeros_like(w))


def test_compile_fullgraph_with_inductor():
    x, r, w, _ = inputs(64, 1024, torch.bfloat16, "same", False)
    leaves = [t.requires_grad_() for t in (x, r, w)]

    def block(x, r, w):
        y, s = fn.fused_add_norm(x, r, w, eps=EPS, scale=0.5)
        return (y.float() * s.float()).sum()

    compiled = torch.compile(block, fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(block(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
