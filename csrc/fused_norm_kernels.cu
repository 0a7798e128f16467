// Fused residual add + RMSNorm/LayerNorm kernels (see fused_norm.h for the contract).
//
// Forward: one CTA per row.  Each thread keeps up to kCacheElems elements of its row in registers
// (16-byte vector loads where the row is aligned), so the row is read from memory once; longer rows
// re-read the part that does not fit.  LayerNorm's variance is a second pass over the registers,
// not E[x^2] - E[x]^2.
// Backward: a persistent grid; each CTA walks rows blockIdx.x, blockIdx.x + gridDim.x, ... and keeps
// the dweight/dbias partial sums of its columns in registers.  The per-CTA partials are summed in a
// fixed order by a second kernel, so the result is deterministic for a given device.
#include "fused_norm.h"

#include <climits>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace megamix {
namespace {

constexpr int kWarp = 32;
constexpr int kFwdMaxThreads = 1024;
constexpr int kBwdMaxThreads = 512;
constexpr int kCacheElems = 16;  // row elements per thread held in registers (8 unvectorized)
constexpr int kReduceCols = 32;
constexpr int kReduceRows = 8;

// Vectors of VEC elements a thread keeps in registers; the scalar fallback keeps fewer (spills).
__host__ __device__ constexpr int cache_vecs(int vec) { return vec == 1 ? kCacheElems / 2 : kCacheElems / vec; }

template <typename T>
struct TypeTag {
  using type = T;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The value `v` takes once stored as a T (what the residual stream holds).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_float(pack.v[j]);
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int j = 0; j < N; ++j) pack.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

__device__ __forceinline__ float warp_allreduce_sum(float v) {
  // Butterfly: every lane ends with the same bits, since each step adds the same two numbers.
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums each of v[0..N) over the CTA; every thread gets the same result.  blockDim.x % 32 == 0.
template <int N>
__device__ __forceinline__ void block_allreduce_sum(float (&v)[N]) {
  __shared__ float partial[N][kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float w = warp_allreduce_sum(v[i]);
    if (lane == 0) partial[i][warp] = w;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_allreduce_sum(lane < warps ? partial[i][lane] : 0.f);
  __syncthreads();  // `partial` is reused by the next call
}

template <typename Tx, typename Tr, typename Ts, int VEC>
__global__ void __launch_bounds__(kFwdMaxThreads) add_norm_fwd_kernel(const AddNormFwdParams p) {
  constexpr int kVecs = cache_vecs(VEC);
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * p.cols;
  const Tx* __restrict__ x = static_cast<const Tx*>(p.x) + offset;
  const Tr* __restrict__ res = p.residual ? static_cast<const Tr*>(p.residual) + offset : nullptr;
  Ts* s = p.s ? static_cast<Ts*>(p.s) + offset : nullptr;
  Tx* __restrict__ y = static_cast<Tx*>(p.y) + offset;
  const int nvec = static_cast<int>(p.cols / VEC);
  const int stride = blockDim.x;
  const int tail_begin = kVecs * stride + threadIdx.x;  // first vector not kept in registers
  const float inv_cols = 1.f / static_cast<float>(p.cols);

  // The norm's input for vector k: x, or x + residual rounded like the stored residual stream.
  auto load_input = [&](int k, float(&v)[VEC]) {
    load<Tx, VEC>(x + k * VEC, v);
    if (res != nullptr) {
      float r[VEC];
      load<Tr, VEC>(res + k * VEC, r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = round_to<Ts>(v[j] + r[j]);
    }
  };
  // A vector past the register cache, after the first pass: s holds it when there is one.
  auto reload_input = [&](int k, float(&v)[VEC]) {
    if (s != nullptr) {
      load<Ts, VEC>(s + k * VEC, v);
    } else {
      load_input(k, v);
    }
  };

  float cache[kVecs][VEC];
  float stat[1] = {0.f};  // sum of squares (RMS) or sum (LayerNorm)
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int k = threadIdx.x + i * stride;
    if (k < nvec) {
      load_input(k, cache[i]);
      if (s != nullptr) store<Ts, VEC>(s + k * VEC, cache[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) stat[0] += p.rms ? cache[i][j] * cache[i][j] : cache[i][j];
    }
  }
  for (int k = tail_begin; k < nvec; k += stride) {
    float v[VEC];
    load_input(k, v);
    if (s != nullptr) store<Ts, VEC>(s + k * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) stat[0] += p.rms ? v[j] * v[j] : v[j];
  }
  block_allreduce_sum<1>(stat);

  float mean = 0.f;
  float rstd;
  if (p.rms) {
    rstd = rsqrtf(stat[0] * inv_cols + p.eps);
  } else {
    mean = stat[0] * inv_cols;
    float var[1] = {0.f};
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      if (threadIdx.x + i * stride < nvec) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = cache[i][j] - mean;
          var[0] += d * d;
        }
      }
    }
    for (int k = tail_begin; k < nvec; k += stride) {
      float v[VEC];
      reload_input(k, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[j] - mean;
        var[0] += d * d;
      }
    }
    block_allreduce_sum<1>(var);
    rstd = rsqrtf(var[0] * inv_cols + p.eps);
  }
  if (threadIdx.x == 0) {
    if (p.mean != nullptr) p.mean[blockIdx.x] = mean;
    p.rstd[blockIdx.x] = rstd;
  }

  auto write_output = [&](int k, const float(&v)[VEC]) {
    float w[VEC];
    float b[VEC] = {};
    load<float, VEC>(p.weight + k * VEC, w);
    if (p.bias != nullptr) load<float, VEC>(p.bias + k * VEC, b);
    float out[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = ((v[j] - mean) * rstd * w[j] + b[j]) * p.scale;
    store<Tx, VEC>(y + k * VEC, out);
  };
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int k = threadIdx.x + i * stride;
    if (k < nvec) write_output(k, cache[i]);
  }
  for (int k = tail_begin; k < nvec; k += stride) {
    float v[VEC];
    reload_input(k, v);
    write_output(k, v);
  }
}

template <typename Tx, typename Ts, int VEC>
__global__ void __launch_bounds__(kBwdMaxThreads) add_norm_bwd_kernel(const AddNormBwdParams p) {
  constexpr int kVecs = cache_vecs(VEC);
  const int nvec = static_cast<int>(p.cols / VEC);
  const int stride = blockDim.x;
  const int tail_begin = kVecs * stride + threadIdx.x;
  const float inv_cols = 1.f / static_cast<float>(p.cols);
  const bool has_bias = p.dbias != nullptr;
  // This CTA's rows of the [grid, cols] partial sums (dbias's follow dweight's).
  float* part_w = p.workspace + static_cast<int64_t>(blockIdx.x) * p.cols;
  float* part_b = p.workspace + static_cast<int64_t>(gridDim.x + blockIdx.x) * p.cols;

  float w_cache[kVecs][VEC];
  float acc_w[kVecs][VEC];
  float acc_b[kVecs][VEC];
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int k = threadIdx.x + i * stride;
    if (k < nvec) load<float, VEC>(p.weight + k * VEC, w_cache[i]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc_w[i][j] = acc_b[i][j] = 0.f;
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t offset = row * p.cols;
    const Ts* __restrict__ s = static_cast<const Ts*>(p.s) + offset;
    const Tx* __restrict__ dy = static_cast<const Tx*>(p.dy) + offset;
    const Ts* __restrict__ ds = p.ds ? static_cast<const Ts*>(p.ds) + offset : nullptr;
    Ts* __restrict__ dnorm = static_cast<Ts*>(p.dnorm_in) + offset;
    Tx* __restrict__ dx = p.dx ? static_cast<Tx*>(p.dx) + offset : nullptr;
    const float mean = p.mean != nullptr ? p.mean[row] : 0.f;
    const float rstd = p.rstd[row];

    // x̂ = (s - mean) * rstd and g_out = dy * scale for vector k.
    auto load_row = [&](int k, float(&xhat)[VEC], float(&gout)[VEC]) {
      load<Ts, VEC>(s + k * VEC, xhat);
      load<Tx, VEC>(dy + k * VEC, gout);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xhat[j] = (xhat[j] - mean) * rstd;
        gout[j] *= p.scale;
      }
    };

    float xhat_c[kVecs][VEC];
    float gout_c[kVecs][VEC];
    float sums[2] = {0.f, 0.f};  // Σ g·x̂ and Σ g, with g = g_out · weight
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int k = threadIdx.x + i * stride;
      if (k < nvec) {
        load_row(k, xhat_c[i], gout_c[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float g = gout_c[i][j] * w_cache[i][j];
          sums[0] += g * xhat_c[i][j];
          sums[1] += g;
          acc_w[i][j] += gout_c[i][j] * xhat_c[i][j];
          acc_b[i][j] += gout_c[i][j];
        }
      }
    }
    for (int k = tail_begin; k < nvec; k += stride) {
      float xhat[VEC], gout[VEC], w[VEC];
      load_row(k, xhat, gout);
      load<float, VEC>(p.weight + k * VEC, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = gout[j] * w[j];
        sums[0] += g * xhat[j];
        sums[1] += g;
        part_w[k * VEC + j] += gout[j] * xhat[j];  // this thread owns these columns
        if (has_bias) part_b[k * VEC + j] += gout[j];
      }
    }
    block_allreduce_sum<2>(sums);
    const float c1 = sums[0] * inv_cols;
    const float c0 = p.rms ? 0.f : sums[1] * inv_cols;

    auto write_grad = [&](int k, const float(&xhat)[VEC], const float(&gout)[VEC],
                          const float(&w)[VEC]) {
      float d[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) d[j] = rstd * (gout[j] * w[j] - c0 - xhat[j] * c1);
      if (ds != nullptr) {
        float incoming[VEC];
        load<Ts, VEC>(ds + k * VEC, incoming);
#pragma unroll
        for (int j = 0; j < VEC; ++j) d[j] += incoming[j];
      }
      store<Ts, VEC>(dnorm + k * VEC, d);
      if (dx != nullptr) store<Tx, VEC>(dx + k * VEC, d);
    };
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int k = threadIdx.x + i * stride;
      if (k < nvec) write_grad(k, xhat_c[i], gout_c[i], w_cache[i]);
    }
    for (int k = tail_begin; k < nvec; k += stride) {
      float xhat[VEC], gout[VEC], w[VEC];
      load_row(k, xhat, gout);
      load<float, VEC>(p.weight + k * VEC, w);
      write_grad(k, xhat, gout, w);
    }
  }

#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int k = threadIdx.x + i * stride;
    if (k < nvec) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        part_w[k * VEC + j] = acc_w[i][j];
        if (has_bias) part_b[k * VEC + j] = acc_b[i][j];
      }
    }
  }
}

// out[c] = Σ_b partial[b][c] over the backward's CTAs, in a fixed order; blockIdx.y picks
// dweight (0) or dbias (1).
__global__ void __launch_bounds__(kReduceCols* kReduceRows)
    reduce_partials_kernel(const float* __restrict__ workspace, int parts, int64_t cols,
                           float* __restrict__ dweight, float* __restrict__ dbias) {
  __shared__ float tile[kReduceRows][kReduceCols + 1];
  const float* partial = workspace + static_cast<int64_t>(blockIdx.y) * parts * cols;
  float* out = blockIdx.y == 0 ? dweight : dbias;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  float acc = 0.f;
  if (col < cols) {
    for (int b = threadIdx.y; b < parts; b += kReduceRows) acc += partial[b * cols + col];
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.f;
#pragma unroll
    for (int r = 0; r < kReduceRows; ++r) total += tile[r][threadIdx.x];
    out[col] = total;
  }
}

bool aligned(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

int threads_for(int64_t nvec, int vecs_per_thread, int max_threads) {
  const int64_t wanted = (nvec + vecs_per_thread - 1) / vecs_per_thread;
  const int64_t rounded = (wanted + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(rounded < kWarp ? kWarp : (rounded > max_threads ? max_threads : rounded));
}

template <typename Tx, typename Tr, typename Ts, int VEC>
cudaError_t launch_fwd(const AddNormFwdParams& p, cudaStream_t stream) {
  const int threads = threads_for(p.cols / VEC, cache_vecs(VEC), kFwdMaxThreads);
  add_norm_fwd_kernel<Tx, Tr, Ts, VEC><<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Tx, typename Tr, typename Ts>
cudaError_t launch_fwd(const AddNormFwdParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(Tx);
  const bool vectorized = p.cols % kVec == 0 && aligned(p.x, kVec * sizeof(Tx)) &&
                          aligned(p.residual, kVec * sizeof(Tr)) &&
                          aligned(p.s, kVec * sizeof(Ts)) && aligned(p.y, kVec * sizeof(Tx)) &&
                          aligned(p.weight, kVec * sizeof(float)) &&
                          aligned(p.bias, kVec * sizeof(float));
  return vectorized ? launch_fwd<Tx, Tr, Ts, kVec>(p, stream) : launch_fwd<Tx, Tr, Ts, 1>(p, stream);
}

template <typename T>
cudaError_t launch_fwd_half(const AddNormFwdParams& p, cudaStream_t stream) {
  if (p.residual == nullptr) return launch_fwd<T, T, T>(p, stream);
  if (p.res_dtype == p.x_dtype && p.s_dtype == p.x_dtype) return launch_fwd<T, T, T>(p, stream);
  if (p.res_dtype == p.x_dtype && p.s_dtype == DType::kFloat32) {
    return launch_fwd<T, T, float>(p, stream);
  }
  if (p.res_dtype == DType::kFloat32 && p.s_dtype == DType::kFloat32) {
    return launch_fwd<T, float, float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

// Calls f(TypeTag<Tx>, TypeTag<Ts>) for the backward's supported dtype pairs.
template <typename F>
cudaError_t dispatch_bwd(const AddNormBwdParams& p, F&& f) {
  const bool s_fp32 = p.s_dtype == DType::kFloat32;
  switch (p.x_dtype) {
    case DType::kFloat32:
      if (s_fp32) return f(TypeTag<float>{}, TypeTag<float>{});
      break;
    case DType::kBFloat16:
      if (s_fp32) return f(TypeTag<__nv_bfloat16>{}, TypeTag<float>{});
      if (p.s_dtype == p.x_dtype) return f(TypeTag<__nv_bfloat16>{}, TypeTag<__nv_bfloat16>{});
      break;
    case DType::kFloat16:
      if (s_fp32) return f(TypeTag<__half>{}, TypeTag<float>{});
      if (p.s_dtype == p.x_dtype) return f(TypeTag<__half>{}, TypeTag<__half>{});
      break;
  }
  return cudaErrorInvalidValue;
}

template <typename Tx, typename Ts, int VEC>
cudaError_t plan_bwd(AddNormBwdParams* p) {
  const int64_t nvec = p->cols / VEC;
  const int threads = threads_for(nvec, cache_vecs(VEC), kBwdMaxThreads);
  int blocks_per_sm = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks_per_sm, add_norm_bwd_kernel<Tx, Ts, VEC>, threads, 0);
  if (err != cudaSuccess) return err;
  int device = 0;
  int sms = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) {
    return err;
  }
  const int64_t resident = static_cast<int64_t>(sms) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  p->grid = static_cast<int>(p->rows < resident ? p->rows : resident);
  p->threads = threads;
  p->vec = VEC;
  p->zero_workspace = nvec > static_cast<int64_t>(cache_vecs(VEC)) * threads;
  return cudaSuccess;
}

template <typename Tx, typename Ts>
cudaError_t plan_bwd(AddNormBwdParams* p) {
  constexpr int kVec = 16 / sizeof(Tx);
  const bool vectorized = p->cols % kVec == 0 && aligned(p->dy, kVec * sizeof(Tx)) &&
                          aligned(p->ds, kVec * sizeof(Ts)) && aligned(p->s, kVec * sizeof(Ts)) &&
                          aligned(p->dnorm_in, kVec * sizeof(Ts)) &&
                          aligned(p->dx, kVec * sizeof(Tx)) &&
                          aligned(p->weight, kVec * sizeof(float));
  return vectorized ? plan_bwd<Tx, Ts, kVec>(p) : plan_bwd<Tx, Ts, 1>(p);
}

bool sizes_supported(int64_t rows, int64_t cols) {
  return rows >= 0 && cols >= 0 && rows <= INT_MAX && cols <= INT_MAX / 2;
}

}  // namespace

cudaError_t add_norm_fwd(const AddNormFwdParams& p, cudaStream_t stream) {
  if (!sizes_supported(p.rows, p.cols)) return cudaErrorInvalidValue;
  if ((p.residual == nullptr) != (p.s == nullptr)) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  switch (p.x_dtype) {
    case DType::kFloat32:
      if (p.residual != nullptr &&
          (p.res_dtype != DType::kFloat32 || p.s_dtype != DType::kFloat32)) {
        return cudaErrorInvalidValue;
      }
      return launch_fwd<float, float, float>(p, stream);
    case DType::kBFloat16:
      return launch_fwd_half<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_fwd_half<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t add_norm_bwd_plan(AddNormBwdParams* p, int64_t* workspace_floats) {
  *workspace_floats = 0;
  if (!sizes_supported(p->rows, p->cols)) return cudaErrorInvalidValue;
  if (p->rows == 0 || p->cols == 0) {
    p->grid = 0;
    return cudaSuccess;
  }
  const cudaError_t err = dispatch_bwd(*p, [&](auto tx, auto ts) {
    return plan_bwd<typename decltype(tx)::type, typename decltype(ts)::type>(p);
  });
  if (err != cudaSuccess) return err;
  *workspace_floats = static_cast<int64_t>(p->grid) * p->cols * (p->dbias != nullptr ? 2 : 1);
  return cudaSuccess;
}

cudaError_t add_norm_bwd(const AddNormBwdParams& p, cudaStream_t stream) {
  if (p.cols == 0) return cudaSuccess;
  const size_t param_bytes = static_cast<size_t>(p.cols) * sizeof(float);
  if (p.rows == 0 || p.grid == 0) {
    cudaError_t err = cudaMemsetAsync(p.dweight, 0, param_bytes, stream);
    if (err == cudaSuccess && p.dbias != nullptr) err = cudaMemsetAsync(p.dbias, 0, param_bytes, stream);
    return err;
  }
  if (p.zero_workspace) {
    const size_t bytes = static_cast<size_t>(p.grid) * param_bytes * (p.dbias != nullptr ? 2 : 1);
    const cudaError_t err = cudaMemsetAsync(p.workspace, 0, bytes, stream);
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err = dispatch_bwd(p, [&](auto tx, auto ts) {
    using Tx = typename decltype(tx)::type;
    using Ts = typename decltype(ts)::type;
    constexpr int kVec = 16 / sizeof(Tx);
    if (p.vec == kVec) {
      add_norm_bwd_kernel<Tx, Ts, kVec><<<p.grid, p.threads, 0, stream>>>(p);
    } else {
      add_norm_bwd_kernel<Tx, Ts, 1><<<p.grid, p.threads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.cols + kReduceCols - 1) / kReduceCols),
                  p.dbias != nullptr ? 2 : 1);
  reduce_partials_kernel<<<grid, dim3(kReduceCols, kReduceRows), 0, stream>>>(
      p.workspace, p.grid, p.cols, p.dweight, p.dbias);
  return cudaGetLastError();
}

}  // namespace megamix
