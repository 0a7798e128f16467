// Torch binding of the fused add + norm kernels: the CUDA implementations of the operators
// megamix::add_norm_fwd and megamix::add_norm_bwd.  The schemas, the CPU implementations, the fake
// (meta) implementations and the autograd formula live in megamix/ops/fused_norm.py; loading this
// library only adds the CUDA kernels.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "fused_norm.h"

namespace {

using at::Tensor;

megamix::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return megamix::DType::kFloat32;
    case at::kHalf:
      return megamix::DType::kFloat16;
    case at::kBFloat16:
      return megamix::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fused_norm: unsupported dtype ", t);
  }
}

// Rows of the [rows, cols] view the kernels see: the product of all but the last dimension.
int64_t rows_of(const Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

// A contiguous copy of `t` whose data starts on a 16-byte boundary.  The kernels move every row
// array in aligned 16-byte vectors (a row's unaligned head and tail columns are scalars), which
// needs all of them to share one alignment phase; fresh allocations do, and a view that starts
// elsewhere (x[1:] of a flat buffer) is copied here once, the rare case.
Tensor aligned_contiguous(const Tensor& t) {
  Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// weight/bias in their own dtype (fp32, or the bf16/fp16 of FSDP2's compute parameters): the
// kernels convert while they read, no fp32 copy per call.
Tensor param(const Tensor& t) {
  to_dtype(t.scalar_type());  // one of the three
  return t.contiguous();
}

void check_on(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), "fused_norm: ", name, " is on ", t.device(),
              ", expected ", like.device());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_fwd(
    const Tensor& x, const std::optional<Tensor>& residual, const Tensor& weight,
    const std::optional<Tensor>& bias, double eps, bool rms, double scale, bool residual_in_fp32,
    std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1, "fused_norm: x must be a CUDA tensor of rank >= 1");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1);
  const int64_t rows = rows_of(x);
  TORCH_CHECK(weight.numel() == cols, "fused_norm: weight has ", weight.numel(),
              " elements for a hidden size of ", cols);
  check_on(weight, x, "weight");
  const Tensor xc = aligned_contiguous(x);
  const Tensor w = param(weight);
  Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == cols, "fused_norm: bias has the wrong size");
    check_on(*bias, x, "bias");
    b = param(*bias);
  }
  Tensor r;
  at::ScalarType s_type = x.scalar_type();
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "fused_norm: residual shape ", residual->sizes(),
                " differs from x's ", x.sizes());
    check_on(*residual, x, "residual");
    r = aligned_contiguous(*residual);
    s_type = residual_in_fp32 ? at::kFloat : at::promote_types(x.scalar_type(), r.scalar_type());
    TORCH_CHECK(r.scalar_type() == x.scalar_type() || r.scalar_type() == at::kFloat,
                "fused_norm: residual dtype must be x's or float32");
  }
  TORCH_CHECK(s_type == x.scalar_type() || s_type == at::kFloat,
              "fused_norm: unsupported residual stream dtype ", s_type);
  const at::ScalarType y_type = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(y_type == x.scalar_type() || (y_type == at::kFloat && r.defined() && s_type == at::kFloat),
              "fused_norm: the output dtype must be x's, or float32 with a float32 residual stream");

  const auto stats = x.options().dtype(at::kFloat);
  Tensor y = at::empty(x.sizes(), xc.options().dtype(y_type));
  Tensor s = r.defined() ? at::empty(x.sizes(), x.options().dtype(s_type)) : at::empty({0}, x.options());
  Tensor mean = rms ? at::empty({0}, stats) : at::empty({rows}, stats);
  Tensor rstd = at::empty({rows}, stats);

  megamix::AddNormFwdParams p;
  p.x = xc.data_ptr();
  p.residual = r.defined() ? r.data_ptr() : nullptr;
  p.weight = w.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.s = r.defined() ? s.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.cols = cols;
  p.eps = static_cast<float>(eps);
  p.scale = static_cast<float>(scale);
  p.rms = rms;
  p.x_dtype = to_dtype(x.scalar_type());
  p.res_dtype = r.defined() ? to_dtype(r.scalar_type()) : p.x_dtype;
  p.s_dtype = to_dtype(s_type);
  p.y_dtype = to_dtype(y_type);
  p.w_dtype = to_dtype(w.scalar_type());
  p.b_dtype = b.defined() ? to_dtype(b.scalar_type()) : p.w_dtype;
  C10_CUDA_CHECK(megamix::add_norm_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {y, s, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_bwd(
    const Tensor& dy, const std::optional<Tensor>& ds, const Tensor& s, const Tensor& weight,
    const Tensor& mean, const Tensor& rstd, bool rms, double scale, bool has_bias,
    at::ScalarType x_dtype) {
  TORCH_CHECK(s.is_cuda() && s.dim() >= 1, "fused_norm: s must be a CUDA tensor of rank >= 1");
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t cols = s.size(-1);
  const int64_t rows = rows_of(s);
  // dy has y's dtype: x's, or float32 where the forward wrote y in float32 from the fp32 stream.
  TORCH_CHECK(dy.sizes() == s.sizes() &&
                  (dy.scalar_type() == x_dtype || (dy.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat)),
              "fused_norm: dy must have s's shape and x's dtype (or float32 with a float32 stream)");
  TORCH_CHECK(s.scalar_type() == x_dtype || s.scalar_type() == at::kFloat,
              "fused_norm: unsupported residual stream dtype ", s.scalar_type());
  TORCH_CHECK(weight.numel() == cols && rstd.numel() == rows && (rms || mean.numel() == rows),
              "fused_norm: weight or statistics have the wrong size");
  for (const Tensor* t : {&dy, &weight, &mean, &rstd}) check_on(*t, s, "a backward input");
  const Tensor dyc = aligned_contiguous(dy);
  const Tensor sc = aligned_contiguous(s);
  const Tensor w = param(weight);
  const Tensor mean_c = mean.contiguous();
  const Tensor rstd_c = rstd.contiguous();
  Tensor dsc;
  if (ds.has_value()) {
    TORCH_CHECK(ds->sizes() == s.sizes() && ds->scalar_type() == s.scalar_type(),
                "fused_norm: the gradient of s must match s");
    check_on(*ds, s, "ds");
    dsc = aligned_contiguous(*ds);
  }

  const auto f32 = s.options().dtype(at::kFloat);
  Tensor dnorm = at::empty(s.sizes(), sc.options());
  Tensor dx = x_dtype != s.scalar_type() ? at::empty(s.sizes(), s.options().dtype(x_dtype))
                                         : at::empty({0}, s.options().dtype(x_dtype));
  Tensor dweight = at::empty(weight.sizes(), f32);
  Tensor dbias = has_bias ? at::empty({cols}, f32) : at::empty({0}, f32);

  megamix::AddNormBwdParams p;
  p.dy = dyc.data_ptr();
  p.ds = dsc.defined() ? dsc.data_ptr() : nullptr;
  p.s = sc.data_ptr();
  p.weight = w.data_ptr();
  p.mean = rms ? nullptr : mean_c.data_ptr<float>();
  p.rstd = rstd_c.data_ptr<float>();
  p.dnorm_in = dnorm.data_ptr();
  p.dx = dx.numel() > 0 ? dx.data_ptr() : nullptr;
  p.dweight = dweight.data_ptr<float>();
  p.dbias = has_bias ? dbias.data_ptr<float>() : nullptr;
  p.rows = rows;
  p.cols = cols;
  p.scale = static_cast<float>(scale);
  p.rms = rms;
  p.x_dtype = to_dtype(x_dtype);
  p.s_dtype = to_dtype(s.scalar_type());
  p.dy_dtype = to_dtype(dyc.scalar_type());
  p.w_dtype = to_dtype(w.scalar_type());
  int64_t workspace_floats = 0;
  C10_CUDA_CHECK(megamix::add_norm_bwd_plan(&p, &workspace_floats));
  Tensor workspace = at::empty({workspace_floats}, f32);
  p.workspace = workspace.data_ptr<float>();
  C10_CUDA_CHECK(megamix::add_norm_bwd(p, c10::cuda::getCurrentCUDAStream()));
  return {dnorm, dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(megamix, CUDA, m) {
  m.impl("add_norm_fwd", &add_norm_fwd);
  m.impl("add_norm_bwd", &add_norm_bwd);
}

// An empty Python module, so that the setuptools build can be imported (which registers the
// kernels above); the JIT build is loaded with torch.ops.load_library instead.
#define MEGAMIX_CONCAT_(a, b) a##b
#define MEGAMIX_CONCAT(a, b) MEGAMIX_CONCAT_(a, b)
#define MEGAMIX_STR_(a) #a
#define MEGAMIX_STR(a) MEGAMIX_STR_(a)

PyMODINIT_FUNC MEGAMIX_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT,
                               MEGAMIX_STR(TORCH_EXTENSION_NAME),
                               "CUDA kernels of megamix::add_norm_fwd/bwd",
                               -1,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr};
  return PyModule_Create(&module);
}
