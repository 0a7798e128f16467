"""Residual add + normalization as one op: the building block of every norm placement.

``fused_add_norm(x, residual, ...)`` returns ``(y, s)`` with ``s = x + residual`` (the new residual
stream) and ``y = (N(s) * weight + bias) * scale``, N being RMSNorm or LayerNorm with statistics in
fp32 (fp64 for fp64 inputs).  Post-LN and DeepNorm use it as ``N(x + F(x))``; Pre-LN, LayerNorm
Scaling (``scale = 1/√(ℓ+1)``) and Peri-LN call :func:`norm`.

DyT (``norm.type: dyt``) is no normalization: :func:`add_dyt` is the add followed by the
elementwise γ·tanh(α·s) + β, in plain torch (torch.compile fuses it); and a norm whose features are
split over tensor-parallel ranks (QK-norm over a column-sharded projection) takes its statistics
from every rank through :func:`norm_split_features`.

Two implementations of the same math:

- the PyTorch reference path (:func:`add_norm_reference`): plain differentiable torch, used for CPU
  tensors, for CUDA tensors when the extension is absent, and everywhere under
  ``MEGAMIX_DISABLE_FUSED=1``; torch.compile fuses it like any other torch code;
- the operators ``megamix::add_norm_fwd`` / ``megamix::add_norm_bwd`` (:func:`add_norm_op`): the
  CUDA kernels of ``csrc/`` (one read of x and residual, one write of y and s forward; the backward
  adds the incoming gradient of s and reduces dweight/dbias in two deterministic stages).  They
  carry a fake implementation and an autograd formula, so torch.compile traces them as single
  nodes; their CPU implementation is the same formulas in torch, which lets CI check the backward
  formulas and the registration without a GPU.

Both work on plain local tensors, so tensor- and sequence-parallel shards need nothing special
(under sequence parallelism dweight is a partial sum over the local rows, which the parallel layer
all-reduces like any replicated parameter's gradient).
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KINDS = ("rms", "layer")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    kind: str = "rms",
    scale: float = 1.0,
) -> torch.Tensor:
    """``(N(x) * weight + bias) * scale`` with statistics in fp32; the output has ``x``'s dtype."""
    return fused_add_norm(x, None, weight, bias, eps, kind, scale)[0]


def fused_add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None = None, eps: float = 1e-6, kind: str = "rms", scale: float = 1.0,
                   residual_in_fp32: bool = False, out_dtype: torch.dtype | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N(x + residual) * scale, x + residual)``; ``residual=None`` means no add.

    The sum is rounded to the residual stream's dtype (``x + residual``'s, or at least fp32 with
    ``residual_in_fp32``) before it is normalized, exactly as the unfused code would; ``y`` has
    ``x``'s dtype, or ``out_dtype`` (a Post-LN norm whose output is the fp32 stream).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {KINDS}")
    if (kernel_writes(x, residual, residual_in_fp32, out_dtype) and _kernels_apply(x, residual, weight, bias)
            and _use_kernels(x.device.type)):
        return add_norm_op(x, residual, weight, bias, eps, kind, scale, residual_in_fp32, out_dtype)
    return add_norm_reference(x, residual, weight, bias, eps, kind, scale, residual_in_fp32, out_dtype)


def kernel_writes(x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool,
                  out_dtype: torch.dtype | None) -> bool:
    """Whether the kernels write ``y`` in ``out_dtype``: x's dtype, or fp32 from the fp32 residual
    stream (a Post-LN norm whose output becomes the fp32 stream under bf16 autocast)."""
    if out_dtype is None or out_dtype == x.dtype:
        return True
    return (out_dtype == torch.float32 and residual is not None
            and stream_dtype(x, residual, residual_in_fp32) == torch.float32)


def stream_dtype(
    x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool
) -> torch.dtype:
    """The dtype of the returned residual stream ``s``."""
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return torch.promote_types(dtype, torch.float32) if residual_in_fp32 else dtype


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation: fp32, or fp64 for fp64 tensors (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor | None = None, eps: float = 1e-6, kind: str = "rms", scale: float = 1.0,
                       residual_in_fp32: bool = False, out_dtype: torch.dtype | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path of :func:`fused_add_norm`: plain torch, differentiated by autograd."""
    dtype = stream_dtype(x, residual, residual_in_fp32)
    s = x.to(dtype) if residual is None else x.to(dtype) + residual.to(dtype)
    acc = _acc_dtype(s.dtype)
    v = s.to(acc)
    if kind == "rms":
        n = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    elif kind == "layer":
        n = F.layer_norm(v, v.shape[-1:], eps=eps)
    else:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {KINDS}")
    y = n * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    if scale != 1.0:
        y = y * scale
    return y.to(out_dtype or x.dtype), s


def add_norm_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                bias: torch.Tensor | None = None, eps: float = 1e-6, kind: str = "rms", scale: float = 1.0,
                residual_in_fp32: bool = False, out_dtype: torch.dtype | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fused_add_norm` through the ``megamix::add_norm_fwd`` operator (CUDA kernel or CPU).
    ``y`` is computed in fp32 and rounded once to ``out_dtype`` (default x's dtype); the CUDA
    kernels take x's dtype, or fp32 when the residual stream is fp32 (:func:`kernel_writes`)."""
    if out_dtype == x.dtype:
        out_dtype = None
    y, s, _, _ = torch.ops.megamix.add_norm_fwd(
        x, residual, weight, bias, eps, kind == "rms", scale, residual_in_fp32, out_dtype
    )
    if residual is None:
        s = x.to(stream_dtype(x, None, residual_in_fp32))
    return y, s


def add_dyt(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
            alpha: torch.Tensor, scale: float = 1.0, out_dtype: torch.dtype | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``((weight ⊙ tanh(alpha · s) + bias) * scale, s)`` with ``s = x + residual``: DyT behind the
    interface of :func:`fused_add_norm` (the same dtypes: ``s`` the wider one, ``y`` ``x``'s or
    ``out_dtype``; computed in fp32, fp64 for fp64 tensors)."""
    dtype = stream_dtype(x, residual, False)
    s = x.to(dtype) if residual is None else x.to(dtype) + residual.to(dtype)
    acc = _acc_dtype(s.dtype)
    y = torch.tanh(alpha.to(acc) * s.to(acc)) * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    if scale != 1.0:
        y = y * scale
    return y.to(out_dtype or x.dtype), s


def norm_split_features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, kind: str,
                        features: int, reduce_sum) -> torch.Tensor:
    """RMSNorm or LayerNorm of rows whose ``features`` columns are split over ranks: ``x`` holds this
    rank's columns, ``weight``/``bias`` their shards, ``reduce_sum`` sums a tensor over the ranks
    (differentiably).  The same statistics as one process: Σx² (and Σx, then Σ(x − mean)²) over all
    columns.  The output has ``x``'s dtype."""
    acc = _acc_dtype(x.dtype)
    v = x.to(acc)
    if kind == "rms":
        n = v * torch.rsqrt(reduce_sum(v.pow(2).sum(-1, keepdim=True)) / features + eps)
    elif kind == "layer":
        centered = v - reduce_sum(v.sum(-1, keepdim=True)) / features
        n = centered * torch.rsqrt(reduce_sum(centered.pow(2).sum(-1, keepdim=True)) / features + eps)
    else:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {KINDS}")
    y = n * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


# --- dispatch ---------------------------------------------------------------------------------

_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


def _kernels_apply(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None
) -> bool:
    return x.device.type == "cuda" and kernel_supports(x, residual, weight, bias)


def kernel_supports(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None
) -> bool:
    """Whether the CUDA kernels take these dtypes (any shape; other cases use the PyTorch path)."""
    return (
        x.dim() >= 1
        and x.dtype in KERNEL_DTYPES
        and weight.dtype in KERNEL_DTYPES
        and (bias is None or bias.dtype in KERNEL_DTYPES)
        and (residual is None or residual.dtype in (x.dtype, torch.float32))
    )


_cuda_kernels: tuple[bool, str] | None = None  # (loaded, how or why not), once per process


def _load_cuda_kernels(distributed_barrier: bool = False) -> tuple[bool, str]:
    global _cuda_kernels
    if _cuda_kernels is None:
        from megamix.ops.build import load_extension

        _cuda_kernels = load_extension(distributed_barrier)
    return _cuda_kernels


def _use_kernels(device_type: str) -> bool:
    """Use the CUDA kernels for tensors on ``device_type``?  Logged once per outcome."""
    if device_type != "cuda":
        _log_once(f"fused_norm: PyTorch reference path for {device_type} tensors")
        return False
    if os.environ.get("MEGAMIX_DISABLE_FUSED") == "1":
        _log_once("fused_norm: PyTorch reference path (MEGAMIX_DISABLE_FUSED=1)")
        return False
    loaded, how = _load_cuda_kernels()
    _log_once(f"fused_norm: CUDA kernels, {how}" if loaded else f"fused_norm: PyTorch reference path ({how})")
    return loaded


# torch.compile treats the choice as a constant of the graph.  This is what
# ``torch.compiler.assume_constant_result`` does, without importing dynamo (a second of start-up)
# for runs that never compile; tests/test_fused_norm.py checks that the two stay the same.
_use_kernels._dynamo_marked_constant = True


def load_kernels(distributed_barrier: bool = True) -> bool:
    """Resolve and log the implementation at start-up; True when the CUDA kernels will run.

    Call it on every rank after the process groups exist and before the first forward: a JIT build
    then happens on rank 0 first while the others wait at a barrier, then they load its build.
    Without this call the first CUDA forward loads the extension lazily, without the barrier.
    """
    if not torch.cuda.is_available():
        return _use_kernels("cpu")
    if os.environ.get("MEGAMIX_DISABLE_FUSED") != "1":
        _load_cuda_kernels(distributed_barrier)
    return _use_kernels("cuda")


# --- the operators: schema, CPU implementation, fake implementation, autograd ------------------
# The CUDA implementations are registered by csrc/fused_norm_binding.cpp when it is loaded.

torch.library.define(
    "megamix::add_norm_fwd",
    "(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, bool rms, float scale,"
    " bool residual_in_fp32, ScalarType? out_dtype=None) -> (Tensor y, Tensor s, Tensor mean, Tensor rstd)",
)
torch.library.define(
    "megamix::add_norm_bwd",
    "(Tensor dy, Tensor? ds, Tensor s, Tensor weight, Tensor mean, Tensor rstd, bool rms,"
    " float scale, bool has_bias, ScalarType x_dtype)"
    " -> (Tensor dnorm_in, Tensor dx, Tensor dweight, Tensor dbias)",
)
# add_norm_fwd returns y in out_dtype (default x's), s = x + residual (empty without residual) and
# per-row mean (empty for RMS) and rstd.  add_norm_bwd takes dy in y's dtype and the norm's input
# (s, or x without residual) and returns its gradient in s's dtype, the same in x's dtype when that
# differs (else empty), and dweight/dbias (dbias empty without bias) in the accumulation dtype.


def _rows(t: torch.Tensor) -> int:
    return math.prod(t.shape[:-1])


@torch.library.impl("megamix::add_norm_fwd", "CPU")
def _add_norm_fwd_cpu(x, residual, weight, bias, eps, rms, scale, residual_in_fp32, out_dtype=None):
    cols = x.shape[-1]
    if residual is None:
        s, norm_in = x.new_empty(0), x
    else:
        dtype = stream_dtype(x, residual, residual_in_fp32)
        s = x.to(dtype) + residual.to(dtype)
        norm_in = s
    acc = _acc_dtype(norm_in.dtype)
    v = norm_in.reshape(-1, cols).to(acc)
    if rms:
        mean = v.new_empty(0)
        rstd = torch.rsqrt(v.pow(2).mean(-1) + eps)
        xhat = v * rstd[:, None]
    else:
        mean = v.mean(-1)
        centered = v - mean[:, None]
        rstd = torch.rsqrt(centered.pow(2).mean(-1) + eps)
        xhat = centered * rstd[:, None]
    y = xhat * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return (y * scale).to(out_dtype or x.dtype).reshape(x.shape), s, mean, rstd


@torch.library.register_fake("megamix::add_norm_fwd")
def _add_norm_fwd_fake(x, residual, weight, bias, eps, rms, scale, residual_in_fp32, out_dtype=None):
    rows = _rows(x)
    if residual is None:
        s = x.new_empty(0)
    else:
        s = x.new_empty(x.shape, dtype=stream_dtype(x, residual, residual_in_fp32))
    acc = _acc_dtype(s.dtype if residual is not None else x.dtype)
    mean = x.new_empty(0 if rms else rows, dtype=acc)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), s, mean, x.new_empty(rows, dtype=acc)


@torch.library.impl("megamix::add_norm_bwd", "CPU")
def _add_norm_bwd_cpu(dy, ds, s, weight, mean, rstd, rms, scale, has_bias, x_dtype):
    cols = s.shape[-1]
    acc = _acc_dtype(s.dtype)
    v = s.reshape(-1, cols).to(acc)
    xhat = (v if rms else v - mean[:, None].to(acc)) * rstd[:, None].to(acc)
    gout = dy.reshape(-1, cols).to(acc) * scale
    g = gout * weight.reshape(-1).to(acc)
    d = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if not rms:
        d = d - g.mean(-1, keepdim=True)
    d = d * rstd[:, None].to(acc)
    if ds is not None:
        d = d + ds.reshape(-1, cols).to(acc)
    dnorm = d.to(s.dtype).reshape(s.shape)
    dx = d.to(x_dtype).reshape(s.shape) if x_dtype != s.dtype else s.new_empty(0, dtype=x_dtype)
    dweight = (gout * xhat).sum(0).reshape(weight.shape)
    dbias = gout.sum(0) if has_bias else v.new_empty(0)
    return dnorm, dx, dweight, dbias


@torch.library.register_fake("megamix::add_norm_bwd")
def _add_norm_bwd_fake(dy, ds, s, weight, mean, rstd, rms, scale, has_bias, x_dtype):
    acc = _acc_dtype(s.dtype)
    dx = s.new_empty(s.shape if x_dtype != s.dtype else 0, dtype=x_dtype)
    dbias = s.new_empty(s.shape[-1] if has_bias else 0, dtype=acc)
    return s.new_empty(s.shape), dx, weight.new_empty(weight.shape, dtype=acc), dbias


def _add_norm_setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, _eps, rms, scale, _residual_in_fp32, *_out_dtype = inputs
    _y, s, mean, rstd = output
    ctx.set_materialize_grads(False)  # an unused s must not cost a zero-filled gradient
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
    ctx.rms, ctx.scale = rms, scale
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _add_norm_backward(ctx, dy, ds, _dmean, _drstd):
    norm_in, weight, mean, rstd = ctx.saved_tensors
    has_residual = ctx.residual_dtype is not None
    if dy is None:  # only s was used: its gradient passes straight to x and residual
        if not has_residual or ds is None:
            return (None,) * 9
        return ds.to(ctx.x_dtype), ds.to(ctx.residual_dtype), None, None, None, None, None, None, None
    dnorm, dx, dweight, dbias = torch.ops.megamix.add_norm_bwd(
        dy,
        ds if has_residual else None,
        norm_in,
        weight,
        mean,
        rstd,
        ctx.rms,
        ctx.scale,
        ctx.bias_dtype is not None,
        ctx.x_dtype,
    )
    grad_x = dx if ctx.x_dtype != norm_in.dtype else dnorm
    grad_residual = dnorm.to(ctx.residual_dtype) if has_residual else None
    grad_bias = dbias.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return grad_x, grad_residual, dweight.to(weight.dtype), grad_bias, None, None, None, None, None


torch.library.register_autograd(
    "megamix::add_norm_fwd", _add_norm_backward, setup_context=_add_norm_setup_context
)
