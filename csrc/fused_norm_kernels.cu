// Fused residual add + RMSNorm/LayerNorm kernels (see fused_norm.h for the contract and
// fused_norm_layout.h for the index arithmetic: row splits, phases, the backward's shape).
//
// Every row array moves in aligned 16-byte vectors over the row's body, with scalar head and tail
// columns where the hidden size is not a multiple of the vector width (odd sizes keep the vector
// body; the rows of one "class" share their split).  weight and bias are read in their own dtype
// (fp32, bf16, fp16) and staged once per CTA into shared memory as fp32.
//
// Forward: one CTA per row.  Each thread keeps up to 16 elements of its row in registers, so the
// row is read from memory once; rows past 16384 columns re-read the rest.  LayerNorm's variance is
// a second pass over the registers, not E[x^2] - E[x]^2.  y is written in x's dtype, or in fp32
// from an fp32 stream (Post-LN under bf16 autocast).
//
// Backward: a persistent grid of CTAs of up to 1024 threads (<= 64 registers, its launch bound),
// each holding up to 8 row groups (rows in flight, several per CTA for rows up to 4096 columns)
// that walk the rows of one class.  A thread owns 8 elements of every row its group visits; the
// next row's s, dy and statistics are copied into shared memory with cp.async while the current
// one is computed (prefetch that costs no registers).  The row's two sums are reduced in the group
// (warp shuffles, then the warps' sums in order behind a named barrier).  dweight is summed in
// registers, dbias (LayerNorm) in shared memory, per group; the groups are added in group order and
// each CTA writes one row of partials, which a second kernel adds in a fixed order: dweight/dbias
// are deterministic for a given shape and device.  Rows past 8192 columns are cut into column
// windows, with a first launch for each window's partial row sums (no read-modify-write of global
// memory).
#include "fused_norm.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace megamix {
namespace {

using layout::kWarp;
using layout::kFwdMaxThreads;
constexpr int kReduceCols = 32;
constexpr int kReduceRows = 8;

enum BwdMode : int {
  kBwdFull = 0,   // a window is the whole row: sums reduced in the CTA, then the gradients
  kBwdSums = 1,   // windowed, first launch: each window's partial row sums only
  kBwdGrads = 2,  // windowed, second launch: add the windows' sums, then the gradients
};

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

// N elements moved as one access (<= 16 bytes) or as 16-byte pieces (32 bytes: fp32 beside bf16).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void load(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = load_pack<T, N>(p);
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

// weight/bias, in whatever dtype they come: one element, or N (as a vector when `vec_ok`).
__device__ __forceinline__ float load_param(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kBFloat16:
      return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat16:
      return to_float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
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

// ---------------------------------------------------------------------------------------------
// Forward

// VEC floats of slot k from a slot_index array of `slots` vectors (16-byte pieces).
template <int VEC>
__device__ __forceinline__ void load_slot(const float* base, int k, int slots, float (&out)[VEC]) {
#pragma unroll
  for (int c = 0; c < (VEC + 3) / 4; ++c) {
    const float4 v = reinterpret_cast<const float4*>(base)[c * slots + k];
    out[4 * c] = v.x;
    if (4 * c + 1 < VEC) out[4 * c + 1] = v.y;
    if (4 * c + 2 < VEC) out[4 * c + 2] = v.z;
    if (4 * c + 3 < VEC) out[4 * c + 3] = v.w;
  }
}

template <typename Tx, typename Tr, typename Ts, typename Ty, int VEC>
__global__ void __launch_bounds__(kFwdMaxThreads) add_norm_fwd_kernel(const AddNormFwdParams p) {
  static_assert(VEC % 4 == 0, "vectors of whole float4s of parameters");
  constexpr int kVecs = layout::fwd_cache_vecs(VEC);
  extern __shared__ float4 fwd_smem4[];
  const int64_t row = blockIdx.x;
  const int64_t offset = row * p.cols;
  const Tx* __restrict__ x = static_cast<const Tx*>(p.x) + offset;
  const Tr* __restrict__ res = p.residual ? static_cast<const Tr*>(p.residual) + offset : nullptr;
  Ts* s = p.s ? static_cast<Ts*>(p.s) + offset : nullptr;
  Ty* __restrict__ y = static_cast<Ty*>(p.y) + offset;
  const layout::RowSplit split = layout::split_row(row, p.cols, VEC, p.phase);
  const int nvec = split.nvec;
  const int stride = blockDim.x;
  const int cached = layout::fwd_cached_vecs(nvec, stride, VEC);  // vectors kept in registers
  const int tail_begin = kVecs * stride + threadIdx.x;  // first vector not kept in registers
  const float inv_cols = 1.f / static_cast<float>(p.cols);
  const bool has_scalar = threadIdx.x < split.nscalar;  // head or tail column of this thread
  const int64_t scalar_col = has_scalar ? layout::scalar_col(threadIdx.x, split, VEC) : 0;
  auto col_of = [&](int k) { return layout::vector_col(k, split, VEC); };

  // weight and bias, from whatever dtype and alignment they have, into shared memory as fp32 by
  // slot (read below as aligned vectors whatever the row's split); synchronized by the first
  // reduction.
  float* smem = reinterpret_cast<float*>(fwd_smem4);
  float* w_s = smem;
  float* b_s = smem + layout::fwd_param_floats(cached, VEC);
  float* w_sc = w_s + cached * VEC;
  float* b_sc = b_s + cached * VEC;
  for (int i = threadIdx.x; i < cached * VEC; i += stride) {
    const int k = i / VEC;
    const int e = i % VEC;
    w_s[layout::slot_index(k, e, cached)] = load_param(p.weight, p.w_dtype, col_of(k) + e);
    if (p.bias != nullptr) b_s[layout::slot_index(k, e, cached)] = load_param(p.bias, p.b_dtype, col_of(k) + e);
  }
  if (has_scalar) {
    w_sc[threadIdx.x] = load_param(p.weight, p.w_dtype, scalar_col);
    if (p.bias != nullptr) b_sc[threadIdx.x] = load_param(p.bias, p.b_dtype, scalar_col);
  }

  // The norm's input for vector k: x, or x + residual rounded like the stored residual stream.
  auto load_input = [&](int k, float(&v)[VEC]) {
    load<Tx, VEC>(x + col_of(k), v);
    if (res != nullptr) {
      float r[VEC];
      load<Tr, VEC>(res + col_of(k), r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = round_to<Ts>(v[j] + r[j]);
    }
  };
  // A vector past the register cache, after the first pass: s holds it when there is one.
  auto reload_input = [&](int k, float(&v)[VEC]) {
    if (s != nullptr) {
      load<Ts, VEC>(s + col_of(k), v);
    } else {
      load_input(k, v);
    }
  };

  float cache[kVecs][VEC];
  float scalar = 0.f;
  float stat[1] = {0.f};  // sum of squares (RMS) or sum (LayerNorm)
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int k = threadIdx.x + i * stride;
    if (k < nvec) {
      load_input(k, cache[i]);
      if (s != nullptr) store<Ts, VEC>(s + col_of(k), cache[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) stat[0] += p.rms ? cache[i][j] * cache[i][j] : cache[i][j];
    }
  }
  for (int k = tail_begin; k < nvec; k += stride) {
    float v[VEC];
    load_input(k, v);
    if (s != nullptr) store<Ts, VEC>(s + col_of(k), v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) stat[0] += p.rms ? v[j] * v[j] : v[j];
  }
  if (has_scalar) {
    scalar = to_float(x[scalar_col]);
    if (res != nullptr) {
      scalar = round_to<Ts>(scalar + to_float(res[scalar_col]));
      s[scalar_col] = from_float<Ts>(scalar);
    }
    stat[0] += p.rms ? scalar * scalar : scalar;
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
    if (has_scalar) var[0] += (scalar - mean) * (scalar - mean);
    block_allreduce_sum<1>(var);
    rstd = rsqrtf(var[0] * inv_cols + p.eps);
  }
  if (threadIdx.x == 0) {
    if (p.mean != nullptr) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

  auto write_output = [&](int k, const float(&v)[VEC], const float(&w)[VEC], const float(&b)[VEC]) {
    float out[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = ((v[j] - mean) * rstd * w[j] + b[j]) * p.scale;
    store<Ty, VEC>(y + col_of(k), out);
  };
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int k = threadIdx.x + i * stride;
    if (k < nvec) {
      float w[VEC], b[VEC] = {};
      load_slot<VEC>(w_s, k, cached, w);
      if (p.bias != nullptr) load_slot<VEC>(b_s, k, cached, b);
      write_output(k, cache[i], w, b);
    }
  }
  // Rows longer than the register cache (> 16384 columns): parameters straight from memory.
  for (int k = tail_begin; k < nvec; k += stride) {
    float v[VEC], w[VEC], b[VEC] = {};
    reload_input(k, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      w[j] = load_param(p.weight, p.w_dtype, col_of(k) + j);
      if (p.bias != nullptr) b[j] = load_param(p.bias, p.b_dtype, col_of(k) + j);
    }
    write_output(k, v, w, b);
  }
  if (has_scalar) {
    const float b = p.bias != nullptr ? b_sc[threadIdx.x] : 0.f;
    y[scalar_col] = from_float<Ty>(((scalar - mean) * rstd * w_sc[threadIdx.x] + b) * p.scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// Makes the compiler forget what it knows of `pack`'s value (an empty asm that "changes" each
// 32-bit word), so that what pass 1 derived from it is recomputed in pass 2 rather than kept
// alive in registers across the row reduction.
template <typename T, int N>
__device__ __forceinline__ void opaque(Pack<T, N>& pack) {
  static_assert(sizeof(Pack<T, N>) % 4 == 0 || sizeof(Pack<T, N>) == 2, "32-bit words or one half");
  if constexpr (sizeof(Pack<T, N>) % 4 == 0) {
    uint32_t* w = reinterpret_cast<uint32_t*>(&pack);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(Pack<T, N>) / 4); ++i) asm volatile("" : "+r"(w[i]));
  } else {
    uint16_t* h = reinterpret_cast<uint16_t*>(&pack);
    asm volatile("" : "+h"(h[0]));
  }
}

__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Asynchronous 16-byte copies global -> shared (sm_80+): the next row travels without occupying
// registers.  Each thread reads back only what it copied itself, so waiting for its own copies
// is enough (no barrier).
// (Before sm_80: plain copies, so that MEGAMIX_CUDA_ARCHS=75 still builds.)
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *static_cast<float4*>(smem_dst) = *static_cast<const float4*>(gmem_src);
#endif
}
__device__ __forceinline__ void cp_async4(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *static_cast<float*>(smem_dst) = *static_cast<const float*>(gmem_src);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// Sums v over the `tpr` threads of row group `group`; every thread of the group gets the same
// bits (warp butterflies, then the warps' sums added in warp order).  `exchange` holds
// [2 parities][warps of the CTA][2]; alternating the parity row by row lets one barrier per row
// suffice: a slot is rewritten two rows later, after every reader passed the next row's barrier.
__device__ __forceinline__ void group_allreduce2(float (&v)[2], float2* exchange, int group, int tpr,
                                                 int parity) {
  v[0] = warp_allreduce_sum(v[0]);
  v[1] = warp_allreduce_sum(v[1]);
  if (tpr == kWarp) return;
  float2* row = exchange + parity * (blockDim.x / kWarp);  // one float2 per warp of the CTA
  if (threadIdx.x % kWarp == 0) row[threadIdx.x / kWarp] = make_float2(v[0], v[1]);
  named_barrier(1 + group, tpr);
  const int warps = tpr / kWarp;
  const float2* mine = row + group * warps;  // this group's warps, added in order
  float a = 0.f, b = 0.f;
  for (int w = 0; w < warps; ++w) {
    const float2 u = mine[w];
    a += u.x;
    b += u.y;
  }
  v[0] = a;
  v[1] = b;
}

template <typename Tx, typename Ts, typename Tdy, int VEC, bool RMS>
__global__ void __launch_bounds__(layout::kBwdMaxThreads)
    add_norm_bwd_kernel(const AddNormBwdParams p, const int mode) {
  constexpr int VPT = layout::kBwdElems / VEC;  // vectors per thread
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const bool has_bias = p.dbias != nullptr;
  const int tpr = p.shape.tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int window = blockIdx.y;
  const layout::RowSplit split = layout::split_row(blockIdx.x % p.shape.period, p.cols, VEC, p.phase);
  const int slots = tpr * VPT;  // vectors of the window
  const layout::BwdSmem m = layout::bwd_smem(p.shape, has_bias);
  float* w_s = smem + m.w;              // the window's weights, slot_index(q, e, slots)
  float* w_sc = smem + m.w_sc;          // the scalar columns' weights
  float2* exchange = reinterpret_cast<float2*>(smem + m.exchange);  // group_allreduce2's
  float* acc_b = smem + m.acc_b + group * m.acc_b_group;  // this group's dbias sums
  float* acc_b_sc = acc_b + slots * VEC;
  // This thread's vectors: k_i = first_k + i * tpr for i < nv (the valid ones are a prefix) at
  // columns col0 + i * tpr * VEC, slots q_i = t + i * tpr; its scalar column, if any.
  const int first_k = static_cast<int>(layout::window_begin(p.shape, window)) + t;
  const int nv = first_k < split.nvec ? min(VPT, (split.nvec - first_k + tpr - 1) / tpr) : 0;
  const int col0 = static_cast<int>(layout::vector_col(first_k, split, VEC));
  const bool has_scalar = window == 0 && t < split.nscalar;
  const int scol = has_scalar ? static_cast<int>(layout::scalar_col(t, split, VEC)) : 0;
  const float inv_cols = 1.f / static_cast<float>(p.cols);

  {
    const int64_t win_begin = layout::window_begin(p.shape, window);
    for (int i = threadIdx.x; i < slots * VEC; i += blockDim.x) {
      const int64_t k = win_begin + i / VEC;
      const float w = k < split.nvec ? load_param(p.weight, p.w_dtype, layout::vector_col(k, split, VEC) + i % VEC) : 0.f;
      w_s[layout::slot_index(i / VEC, i % VEC, slots)] = w;
    }
    if (window == 0 && threadIdx.x < split.nscalar) {
      w_sc[threadIdx.x] = load_param(p.weight, p.w_dtype, layout::scalar_col(threadIdx.x, split, VEC));
    }
    if (has_bias) {
      for (int i = threadIdx.x; i < p.shape.groups * m.acc_b_group; i += blockDim.x) smem[m.acc_b + i] = 0.f;
    }
  }
  __syncthreads();
  auto weight = [&](int i, int e) { return w_s[layout::slot_index(t + i * tpr, e, slots)]; };
  auto bias_sum = [&](int i, int e) -> float& { return acc_b[layout::slot_index(t + i * tpr, e, slots)]; };

  float acc_w[VPT][VEC];
  float acc_w1 = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc_w[i][e] = 0.f;
  }

  // The row this group computes, in registers; the next one (and its statistics) is copied into
  // `stage` meanwhile.  The few scalar columns of an odd-sized row are read when
  // needed, to save registers.
  constexpr int kSChunks = VEC * sizeof(Ts) / 16;    // 16-byte pieces of one vector of s
  constexpr int kDyChunks = VEC * sizeof(Tdy) / 16;  // ... of dy
  static_assert(kSChunks >= 1 && kDyChunks >= 1, "vectors of at least 16 bytes");
  float4* stage = smem4;
  const int threads = blockDim.x;
  float2* stage_stats = reinterpret_cast<float2*>(stage + (kSChunks + kDyChunks) * VPT * threads) + threadIdx.x;
  Pack<Ts, VEC> s_cur[VPT];
  Pack<Tdy, VEC> dy_cur[VPT];
  float mean_cur = 0.f, rstd_cur = 0.f;
  auto fetch = [&](int row) {
    const int64_t offset = static_cast<int64_t>(row) * p.cols + col0;
    const Ts* s = static_cast<const Ts*>(p.s) + offset;
    const Tdy* dy = static_cast<const Tdy*>(p.dy) + offset;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (i < nv) {
#pragma unroll
        for (int c = 0; c < kSChunks; ++c) {
          cp_async16(stage + (i * kSChunks + c) * threads + threadIdx.x, s + i * tpr * VEC + c * (16 / sizeof(Ts)));
        }
#pragma unroll
        for (int c = 0; c < kDyChunks; ++c) {
          cp_async16(stage + (VPT * kSChunks + i * kDyChunks + c) * threads + threadIdx.x,
                     dy + i * tpr * VEC + c * (16 / sizeof(Tdy)));
        }
      }
    }
    if (!RMS) cp_async4(&stage_stats->x, p.mean + row);
    cp_async4(&stage_stats->y, p.rstd + row);
    cp_async_commit();
  };
  auto unstage = [&]() {
    cp_async_wait_all();
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (i < nv) {
#pragma unroll
        for (int c = 0; c < kSChunks; ++c) {
          reinterpret_cast<float4*>(&s_cur[i])[c] = stage[(i * kSChunks + c) * threads + threadIdx.x];
        }
#pragma unroll
        for (int c = 0; c < kDyChunks; ++c) {
          reinterpret_cast<float4*>(&dy_cur[i])[c] = stage[(VPT * kSChunks + i * kDyChunks + c) * threads + threadIdx.x];
        }
      }
    }
    const float2 stats = *stage_stats;
    mean_cur = RMS ? 0.f : stats.x;
    rstd_cur = stats.y;
  };

  // Rows fit in int: sizes_supported.
  const int row_step = p.shape.period * p.shape.blocks_per_class * p.shape.groups;
  int row = static_cast<int>(layout::bwd_row(p.shape, blockIdx.x, group, 0));
  const int rows = static_cast<int>(p.rows);
  if (row < rows) fetch(row);
  int parity = 0;
  while (row < rows) {
    unstage();
    const bool more = row < rows - row_step;  // (row + row_step may not fit an int)
    const int64_t offset = static_cast<int64_t>(row) * p.cols;

    // Pass 1: the row's sums Σ g·x̂ and Σ g (g = dy·scale·weight), and dweight/dbias (the same
    // code in every mode: a windowed launch ignores what it does not need).
    float sums[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (i < nv) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xhat = (to_float(s_cur[i].v[e]) - (RMS ? 0.f : mean_cur)) * rstd_cur;
          const float gout = to_float(dy_cur[i].v[e]) * p.scale;
          const float g = gout * weight(i, e);
          sums[0] += g * xhat;
          sums[1] += g;
          acc_w[i][e] += gout * xhat;
        }
        if (has_bias) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) bias_sum(i, e) += to_float(dy_cur[i].v[e]) * p.scale;
        }
      }
    }
    float s1 = 0.f, dy1 = 0.f;
    if (has_scalar) {
      s1 = to_float(static_cast<const Ts*>(p.s)[offset + scol]);
      dy1 = to_float(static_cast<const Tdy*>(p.dy)[offset + scol]);
      const float xhat = (s1 - (RMS ? 0.f : mean_cur)) * rstd_cur;
      const float gout = dy1 * p.scale;
      const float g = gout * w_sc[t];
      sums[0] += g * xhat;
      sums[1] += g;
      acc_w1 += gout * xhat;
      if (has_bias) acc_b_sc[t] += gout;
    }
    if (mode == kBwdGrads) {
      const float* part = p.workspace + p.shape.sums_offset + static_cast<int64_t>(row) * p.shape.windows * 2;
      sums[0] = sums[1] = 0.f;
      for (int w = 0; w < p.shape.windows; ++w) {
        sums[0] += part[2 * w];
        sums[1] += part[2 * w + 1];
      }
    } else {
      group_allreduce2(sums, exchange, group, tpr, parity);
      // The next row lands in `stage` while this one finishes.  Its reads of `stage` are over:
      // the shuffles above consumed sums derived from every element it read from there.
      if (more) fetch(row + row_step);
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      opaque(s_cur[i]);
      opaque(dy_cur[i]);
    }

    if (mode == kBwdSums) {
      if (t == 0) {
        float* part = p.workspace + p.shape.sums_offset + (static_cast<int64_t>(row) * p.shape.windows + window) * 2;
        part[0] = sums[0];
        part[1] = sums[1];
      }
    } else {
      // Pass 2: d = rstd · (g - c0 - x̂·c1) + ds, one 16-byte piece of s at a time.
      const float c1 = sums[0] * inv_cols;
      const float c0 = RMS ? 0.f : sums[1] * inv_cols;
      constexpr int kChunk = 16 / sizeof(Ts) < VEC ? 16 / sizeof(Ts) : VEC;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        if (i < nv) {
#pragma unroll
          for (int e0 = 0; e0 < VEC; e0 += kChunk) {
            const int64_t c = offset + col0 + i * tpr * VEC + e0;
            float d[kChunk];
            float incoming[kChunk] = {};
            if (p.ds != nullptr) load<Ts, kChunk>(static_cast<const Ts*>(p.ds) + c, incoming);
#pragma unroll
            for (int e = 0; e < kChunk; ++e) {
              const float xhat = (to_float(s_cur[i].v[e0 + e]) - (RMS ? 0.f : mean_cur)) * rstd_cur;
              const float g = to_float(dy_cur[i].v[e0 + e]) * p.scale * weight(i, e0 + e);
              d[e] = rstd_cur * (g - c0 - xhat * c1) + incoming[e];
            }
            store<Ts, kChunk>(static_cast<Ts*>(p.dnorm_in) + c, d);
            if (p.dx != nullptr) store<Tx, kChunk>(static_cast<Tx*>(p.dx) + c, d);
          }
        }
      }
      if (has_scalar) {
        const int64_t c = offset + scol;
        const float xhat = (s1 - (RMS ? 0.f : mean_cur)) * rstd_cur;
        const float g = dy1 * p.scale * w_sc[t];
        float d = rstd_cur * (g - c0 - xhat * c1);
        if (p.ds != nullptr) d += to_float(static_cast<const Ts*>(p.ds)[c]);
        static_cast<Ts*>(p.dnorm_in)[c] = from_float<Ts>(d);
        if (p.dx != nullptr) static_cast<Tx*>(p.dx)[c] = from_float<Tx>(d);
      }
    }
    // Windowed rows have no reduction here: prefetch after pass 2 (whose stores consumed them).
    if (mode == kBwdGrads && more) fetch(row + row_step);
    parity ^= 1;
    if (!more) break;
    row += row_step;
  }
  if (mode == kBwdSums) return;

  // The groups' sums added in group order (dweight's through the weights' shared memory, no
  // longer read; dbias's where they are), then this CTA's row of the partials.
  __syncthreads();
  float* partial = p.workspace + static_cast<int64_t>(blockIdx.x) * p.cols;
  for (int src = 1; src < p.shape.groups; ++src) {
    if (group == src) {
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) w_s[layout::slot_index(t + i * tpr, e, slots)] = acc_w[i][e];
      }
      if (has_scalar) w_sc[t] = acc_w1;
    }
    __syncthreads();
    if (group == 0) {
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc_w[i][e] += w_s[layout::slot_index(t + i * tpr, e, slots)];
      }
      if (has_scalar) acc_w1 += w_sc[t];
      if (has_bias) {
        const float* other = smem + m.acc_b + src * m.acc_b_group;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            bias_sum(i, e) += other[layout::slot_index(t + i * tpr, e, slots)];
          }
        }
        if (has_scalar) acc_b_sc[t] += other[slots * VEC + t];
      }
    }
    __syncthreads();
  }
  if (group == 0) {
    float* partial_b = partial + static_cast<int64_t>(gridDim.x) * p.cols;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (i < nv) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          partial[col0 + i * tpr * VEC + e] = acc_w[i][e];
          if (has_bias) partial_b[col0 + i * tpr * VEC + e] = bias_sum(i, e);
        }
      }
    }
    if (has_scalar) {
      partial[scol] = acc_w1;
      if (has_bias) partial_b[scol] = acc_b_sc[t];
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

// ---------------------------------------------------------------------------------------------
// Host side

// The element index g in [0, vec) at which every array (pointer, element size) is 16-byte
// aligned, or -1.  Vectors k then start at g + k * vec in all of them (vec * size is a multiple of
// 16 for every array: their elements are at least as wide as x's).
int common_phase(std::initializer_list<std::pair<const void*, int>> arrays, int vec) {
  for (int g = 0; g < vec; ++g) {
    bool ok = true;
    for (const auto& [ptr, size] : arrays) {
      if (ptr != nullptr && (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(g) * size) % 16 != 0) {
        ok = false;
      }
    }
    if (ok) return g;
  }
  return -1;
}

// Launch facts remembered per (kernel, device) and (kernel, device, threads, shared memory), so the
// driver queries happen once rather than at every call: the opt-in to the device's most dynamic
// shared memory (set once to the maximum, so no later, smaller setting can break a larger launch),
// and CTAs resident per SM.
struct LaunchFacts {
  const void* kernel;
  int device, threads, smem, blocks_per_sm, sms, smem_max;
};

template <typename Kernel>
cudaError_t launch_facts(Kernel kernel, int threads, int smem, LaunchFacts* out, bool want_occupancy) {
  static std::mutex mutex;
  static std::vector<LaunchFacts> known;  // threads = -1: the per-(kernel, device) entry
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const void* key = reinterpret_cast<const void*>(kernel);
  const std::lock_guard<std::mutex> lock(mutex);
  const LaunchFacts* base = nullptr;
  for (const LaunchFacts& f : known) {
    if (f.kernel != key || f.device != device) continue;
    if (f.threads == -1) base = &f;
    if (want_occupancy && f.threads == threads && f.smem == smem) {
      *out = f;
      return cudaSuccess;
    }
  }
  LaunchFacts facts{key, device, -1, 0, 0, 0, 0};
  if (base != nullptr) {
    facts = *base;
  } else {
    if ((err = cudaDeviceGetAttribute(&facts.sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&facts.smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, facts.smem_max);
    if (err != cudaSuccess) return err;
    known.push_back(facts);
  }
  if (smem > facts.smem_max) return cudaErrorInvalidConfiguration;
  facts.threads = threads;
  facts.smem = smem;
  if (want_occupancy) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&facts.blocks_per_sm, kernel, threads, smem);
    if (err != cudaSuccess) return err;
    known.push_back(facts);
  }
  *out = facts;
  return cudaSuccess;
}

// The binding passes 16-byte aligned tensors (it copies a misaligned view); a caller of this API
// whose tensors share no phase gets cudaErrorMisalignedAddress.
template <typename Tx, typename Tr, typename Ts, typename Ty>
cudaError_t launch_fwd(AddNormFwdParams p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(Tx);
  p.phase = common_phase({{p.x, sizeof(Tx)}, {p.residual, sizeof(Tr)}, {p.s, sizeof(Ts)}, {p.y, sizeof(Ty)}}, kVec);
  if (p.phase < 0) return cudaErrorMisalignedAddress;
  const int threads = layout::fwd_threads(p.cols, kVec);
  const int cached = layout::fwd_cached_vecs(static_cast<int>(p.cols / kVec), threads, kVec);
  const int smem = layout::fwd_param_floats(cached, kVec) * (p.bias != nullptr ? 2 : 1) * static_cast<int>(sizeof(float));
  auto kernel = add_norm_fwd_kernel<Tx, Tr, Ts, Ty, kVec>;
  if (smem > 48 * 1024) {  // past 48 KiB (<= 128 KiB, which A100 and H100 have): opt in, once
    LaunchFacts facts{};
    const cudaError_t err = launch_facts(kernel, threads, smem, &facts, false);
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(p.rows), threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename Ty>
cudaError_t launch_fwd_half(const AddNormFwdParams& p, cudaStream_t stream) {
  const bool s_fp32 = p.residual != nullptr && p.s_dtype == DType::kFloat32;
  if (std::is_same_v<Ty, float> && !s_fp32) return cudaErrorInvalidValue;  // y in fp32 needs the fp32 stream
  if (p.residual == nullptr || (p.res_dtype == p.x_dtype && p.s_dtype == p.x_dtype)) {
    if constexpr (std::is_same_v<Ty, float>) return cudaErrorInvalidValue;
    else return launch_fwd<T, T, T, T>(p, stream);
  }
  if (p.res_dtype == p.x_dtype && s_fp32) return launch_fwd<T, T, float, Ty>(p, stream);
  if (p.res_dtype == DType::kFloat32 && s_fp32) return launch_fwd<T, float, float, Ty>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_fwd_half(const AddNormFwdParams& p, cudaStream_t stream) {
  if (p.y_dtype == p.x_dtype) return launch_fwd_half<T, T>(p, stream);
  if (p.y_dtype == DType::kFloat32) return launch_fwd_half<T, float>(p, stream);
  return cudaErrorInvalidValue;
}

// Calls f(TypeTag<Tx>, TypeTag<Ts>, TypeTag<Tdy>) for the backward's supported dtype triples.
template <typename F>
cudaError_t dispatch_bwd(const AddNormBwdParams& p, F&& f) {
  using bf16 = __nv_bfloat16;
  const bool s_fp32 = p.s_dtype == DType::kFloat32;
  const bool dy_x = p.dy_dtype == p.x_dtype;
  const bool dy_fp32 = p.dy_dtype == DType::kFloat32;
  switch (p.x_dtype) {
    case DType::kFloat32:
      if (s_fp32 && dy_fp32) return f(TypeTag<float>{}, TypeTag<float>{}, TypeTag<float>{});
      break;
    case DType::kBFloat16:
      if (s_fp32 && dy_x) return f(TypeTag<bf16>{}, TypeTag<float>{}, TypeTag<bf16>{});
      if (s_fp32 && dy_fp32) return f(TypeTag<bf16>{}, TypeTag<float>{}, TypeTag<float>{});
      if (p.s_dtype == p.x_dtype && dy_x) return f(TypeTag<bf16>{}, TypeTag<bf16>{}, TypeTag<bf16>{});
      break;
    case DType::kFloat16:
      if (s_fp32 && dy_x) return f(TypeTag<__half>{}, TypeTag<float>{}, TypeTag<__half>{});
      if (s_fp32 && dy_fp32) return f(TypeTag<__half>{}, TypeTag<float>{}, TypeTag<float>{});
      if (p.s_dtype == p.x_dtype && dy_x) return f(TypeTag<__half>{}, TypeTag<__half>{}, TypeTag<__half>{});
      break;
  }
  return cudaErrorInvalidValue;
}

// Calls f(kernel) with the backward kernel for RMSNorm or LayerNorm.
template <typename Tx, typename Ts, typename Tdy, typename F>
cudaError_t with_bwd_kernel(bool rms, F&& f) {
  constexpr int kVec = 16 / sizeof(Tx);
  return rms ? f(add_norm_bwd_kernel<Tx, Ts, Tdy, kVec, true>) : f(add_norm_bwd_kernel<Tx, Ts, Tdy, kVec, false>);
}

template <typename Tx, typename Ts, typename Tdy>
cudaError_t plan_bwd(AddNormBwdParams* p) {
  constexpr int kVec = 16 / sizeof(Tx);
  p->phase = common_phase({{p->dy, sizeof(Tdy)}, {p->ds, sizeof(Ts)}, {p->s, sizeof(Ts)},
                           {p->dnorm_in, sizeof(Ts)}, {p->dx, sizeof(Tx)}}, kVec);
  if (p->phase < 0) return cudaErrorMisalignedAddress;
  const bool has_bias = p->dbias != nullptr;
  p->shape = layout::bwd_block_shape(p->rows, p->cols, kVec, has_bias, sizeof(Ts), sizeof(Tdy));
  LaunchFacts facts{};
  const cudaError_t err = with_bwd_kernel<Tx, Ts, Tdy>(p->rms, [&](auto kernel) {
    return launch_facts(kernel, p->shape.threads, p->shape.smem_bytes, &facts, true);
  });
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(facts.sms) * (facts.blocks_per_sm > 0 ? facts.blocks_per_sm : 1);
  layout::bwd_grid(&p->shape, p->rows, p->cols, resident, has_bias);
  return cudaSuccess;
}

bool sizes_supported(int64_t rows, int64_t cols) {
  return rows >= 0 && cols >= 0 && rows <= INT_MAX && cols <= INT_MAX / 2;
}

bool param_dtype_ok(DType dt) {
  return dt == DType::kFloat32 || dt == DType::kFloat16 || dt == DType::kBFloat16;
}

}  // namespace

cudaError_t add_norm_fwd(const AddNormFwdParams& p, cudaStream_t stream) {
  if (!sizes_supported(p.rows, p.cols)) return cudaErrorInvalidValue;
  if ((p.residual == nullptr) != (p.s == nullptr)) return cudaErrorInvalidValue;
  if (!param_dtype_ok(p.w_dtype) || (p.bias != nullptr && !param_dtype_ok(p.b_dtype))) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  switch (p.x_dtype) {
    case DType::kFloat32:
      if (p.y_dtype != DType::kFloat32) return cudaErrorInvalidValue;
      if (p.residual != nullptr &&
          (p.res_dtype != DType::kFloat32 || p.s_dtype != DType::kFloat32)) {
        return cudaErrorInvalidValue;
      }
      return launch_fwd<float, float, float, float>(p, stream);
    case DType::kBFloat16:
      return launch_fwd_half<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_fwd_half<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t add_norm_bwd_plan(AddNormBwdParams* p, int64_t* workspace_floats) {
  *workspace_floats = 0;
  if (!sizes_supported(p->rows, p->cols) || !param_dtype_ok(p->w_dtype)) return cudaErrorInvalidValue;
  if (p->rows == 0 || p->cols == 0) {
    p->shape = layout::BwdShape();
    p->shape.grid = 0;
    return cudaSuccess;
  }
  const cudaError_t err = dispatch_bwd(*p, [&](auto tx, auto ts, auto tdy) {
    return plan_bwd<typename decltype(tx)::type, typename decltype(ts)::type, typename decltype(tdy)::type>(p);
  });
  if (err != cudaSuccess) return err;
  *workspace_floats = p->shape.workspace_floats;
  return cudaSuccess;
}

cudaError_t add_norm_bwd(const AddNormBwdParams& p, cudaStream_t stream) {
  if (p.cols == 0) return cudaSuccess;
  const size_t param_bytes = static_cast<size_t>(p.cols) * sizeof(float);
  if (p.rows == 0 || p.shape.grid == 0) {
    cudaError_t err = cudaMemsetAsync(p.dweight, 0, param_bytes, stream);
    if (err == cudaSuccess && p.dbias != nullptr) err = cudaMemsetAsync(p.dbias, 0, param_bytes, stream);
    return err;
  }
  const layout::BwdShape& sh = p.shape;
  const cudaError_t err = dispatch_bwd(p, [&](auto tx, auto ts, auto tdy) {
    using Tx = typename decltype(tx)::type;
    using Ts = typename decltype(ts)::type;
    using Tdy = typename decltype(tdy)::type;
    return with_bwd_kernel<Tx, Ts, Tdy>(p.rms, [&](auto kernel) {
      const dim3 grid(static_cast<unsigned>(sh.grid), static_cast<unsigned>(sh.windows));
      if (sh.windows == 1) {
        kernel<<<grid, sh.threads, sh.smem_bytes, stream>>>(p, kBwdFull);
      } else {
        kernel<<<grid, sh.threads, sh.smem_bytes, stream>>>(p, kBwdSums);
        kernel<<<grid, sh.threads, sh.smem_bytes, stream>>>(p, kBwdGrads);
      }
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.cols + kReduceCols - 1) / kReduceCols),
                  p.dbias != nullptr ? 2 : 1);
  reduce_partials_kernel<<<grid, dim3(kReduceCols, kReduceRows), 0, stream>>>(
      p.workspace, sh.grid, p.cols, p.dweight, p.dbias);
  return cudaGetLastError();
}

}  // namespace megamix
