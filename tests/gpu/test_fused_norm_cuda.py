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
# hidden sizes: tiny, not a multiple of 8 (scalar path), the common case, past the backward's
# register cache (8192), past the forward's (16384)
HIDDEN = [64, 1000, 4096, 12288, 20480]
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


def test_misaligned_and_non_contiguous_inputs_take_the_scalar_path():
    rows, hidden = 33, 512
    flat = torch.randn(rows * hidden + 1, device="cuda", dtype=torch.bfloat16)
    x = flat[1:].view(rows, hidden)  # 2-byte offset: no 16-byte vectors
    r = torch.randn(hidden, rows, device="cuda", dtype=torch.bfloat16).t()  # non-contiguous
    w = torch.rand(hidden, device="cuda") + 0.5
    y, s = fn.add_norm_op(x, r, w, None, EPS, "rms")
    want_y = formula(s, None, w, None, "rms", 1.0)[0]
    assert (y.double() - want_y).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * want_y.abs().max()


def test_weight_gradients_are_deterministic():
    x, r, w, b = inputs(3000, 4096, torch.bfloat16, "same", True)
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
