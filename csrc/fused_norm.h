// Fused residual add + RMSNorm/LayerNorm: the launcher API between the CUDA kernels and the
// torch binding.  Plain C++ and the CUDA runtime only, so the kernels compile without torch.
//
// Forward, per row of `cols` elements:
//   s = x + residual          rounded to s_dtype (the residual stream), skipped without residual
//   y = (N(s) * weight + bias) * scale              in y_dtype; statistics in fp32
// where N(s) = s * rstd (RMS) or (s - mean) * rstd (LayerNorm), rstd = 1/sqrt(E[.^2] + eps).
// Backward turns dy (and the incoming gradient ds of s) into the gradient of the norm input,
// plus dweight/dbias reduced over rows in two deterministic stages.  weight and bias are read in
// their own dtypes (fp32, or bf16/fp16 parameters as FSDP2 keeps them): no fp32 copy per call.
// Index arithmetic and the backward's launch shape: fused_norm_layout.h.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "fused_norm_layout.h"

namespace megamix {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct AddNormFwdParams {
  const void* x = nullptr;         // [rows, cols] x_dtype
  const void* residual = nullptr;  // [rows, cols] res_dtype, or nullptr: normalize x itself
  const void* weight = nullptr;    // [cols] w_dtype
  const void* bias = nullptr;      // [cols] b_dtype, or nullptr
  void* y = nullptr;               // [rows, cols] y_dtype
  void* s = nullptr;               // [rows, cols] s_dtype; nullptr exactly when residual is
  float* mean = nullptr;           // [rows], or nullptr for RMSNorm
  float* rstd = nullptr;           // [rows]
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-6f;
  float scale = 1.0f;
  bool rms = true;
  DType x_dtype = DType::kFloat32;
  DType res_dtype = DType::kFloat32;  // x_dtype or kFloat32
  DType s_dtype = DType::kFloat32;    // x_dtype or kFloat32
  DType y_dtype = DType::kFloat32;    // x_dtype, or kFloat32 when s_dtype is (Post-LN's fp32 stream)
  DType w_dtype = DType::kFloat32;    // any of the three
  DType b_dtype = DType::kFloat32;
  int phase = 0;  // set by the launcher (fused_norm_layout.h)
};

struct AddNormBwdParams {
  const void* dy = nullptr;        // [rows, cols] dy_dtype (y's: x_dtype, or kFloat32 as y was)
  const void* ds = nullptr;        // [rows, cols] s_dtype: gradient of the returned s, or nullptr
  const void* s = nullptr;         // [rows, cols] s_dtype: the norm's input saved by the forward
  const void* weight = nullptr;    // [cols] w_dtype
  const float* mean = nullptr;     // [rows], nullptr for RMSNorm
  const float* rstd = nullptr;     // [rows]
  void* dnorm_in = nullptr;        // [rows, cols] s_dtype: gradient of the norm's input (and of s)
  void* dx = nullptr;              // [rows, cols] x_dtype copy of dnorm_in, or nullptr
  float* dweight = nullptr;        // [cols]
  float* dbias = nullptr;          // [cols], or nullptr: no bias
  float* workspace = nullptr;      // add_norm_bwd_plan's workspace_floats floats
  int64_t rows = 0;
  int64_t cols = 0;
  float scale = 1.0f;
  bool rms = true;
  DType x_dtype = DType::kFloat32;
  DType s_dtype = DType::kFloat32;   // x_dtype or kFloat32
  DType dy_dtype = DType::kFloat32;  // x_dtype, or kFloat32 when s_dtype is
  DType w_dtype = DType::kFloat32;
  // Filled by add_norm_bwd_plan.
  layout::BwdShape shape;
  int phase = 0;
};

// Launches the forward on `stream`; cudaErrorInvalidValue for unsupported dtypes or sizes.
cudaError_t add_norm_fwd(const AddNormFwdParams& params, cudaStream_t stream);

// Chooses the backward's launch shape for the current device and the workspace it needs.
cudaError_t add_norm_bwd_plan(AddNormBwdParams* params, int64_t* workspace_floats);

// Launches the backward (after add_norm_bwd_plan and with its workspace) on `stream`.
cudaError_t add_norm_bwd(const AddNormBwdParams& params, cudaStream_t stream);

}  // namespace megamix
