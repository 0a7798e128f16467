// Index arithmetic of the fused add + norm kernels: which thread touches which element, in which
// order rows are visited, and the backward's launch shape.  Plain C++ (host and device), so that
// tests/test_kernel_emulation.py compiles this very header with g++ and checks the index math and
// the reduction order on a CPU against the formulas for awkward sizes.
//
// Vectors.  Every row array (x, residual, s, y, dy, ds, dnorm, dx) is read and written in vectors
// of `vec` elements, vec = 16 bytes / sizeof(x's dtype), each vector 16-byte aligned (arrays of a
// wider dtype, e.g. an fp32 stream beside bf16 x, move 32 bytes as two 16-byte accesses).  The host
// finds the tensors' common `phase`: the element index, mod vec, at which all of them are 16-byte
// aligned (0 for fresh allocations; a sliced view shifts it).  A row then splits into
//   [0, head)                        scalar columns, until the first aligned element,
//   [head, head + nvec * vec)        nvec aligned vectors,
//   [head + nvec * vec, cols)        the scalar tail (< vec columns),
// so any hidden size, and any common misalignment, keeps the vectorized body.  Tensors with no
// common phase are refused by the launchers (cudaErrorMisalignedAddress); the torch binding never
// passes such: it copies a view that does not start on a 16-byte boundary (the rare case).
//
// Rows of one class share their split: row r's split depends on r * cols mod vec, which repeats
// with period vec / gcd(cols, vec) (1 when cols is a multiple of vec).  The backward gives each CTA
// rows of one class only, so a thread owns the same columns in every row it visits and can keep
// their dweight/dbias sums in registers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MEGAMIX_HD __host__ __device__ __forceinline__
#else
#define MEGAMIX_HD inline
#endif

namespace megamix {
namespace layout {

constexpr int kWarp = 32;
constexpr int kBwdMaxThreads = 1024;  // per CTA; also the kernels' launch bound (<= 64 registers)
constexpr int kBwdElems = 8;          // row elements a backward thread holds per row (vpt * vec)
constexpr int kBwdMaxGroups = 8;      // rows in flight per CTA (named barriers 1..8)

struct RowSplit {
  int head;     // leading scalar columns
  int nvec;     // aligned vectors after them
  int nscalar;  // head + tail columns (< 2 * vec)
};

// The split of row `row` for vectors of `vec` elements (a power of two) aligned at element index
// `phase` (mod vec).  32-bit arithmetic and masks only (cols < 2^30): no 64-bit division on a GPU.
MEGAMIX_HD RowSplit split_row(int64_t row, int64_t cols, int vec, int phase) {
  const int mask = vec - 1;
  const int c = static_cast<int>(cols);
  const int start = (static_cast<int>(row & mask) * (c & mask)) & mask;  // (row * cols) mod vec
  int head = (phase - start) & mask;
  if (head > c) head = c;
  RowSplit s;
  s.head = head;
  s.nvec = (c - head) / vec;
  s.nscalar = c - s.nvec * vec;
  return s;
}

// First column of vector k.
MEGAMIX_HD int64_t vector_col(int64_t k, const RowSplit& s, int vec) { return s.head + k * vec; }

// Column of scalar slot t < nscalar: the head's columns, then the tail's.
MEGAMIX_HD int64_t scalar_col(int t, const RowSplit& s, int vec) {
  return t < s.head ? t : static_cast<int64_t>(s.nvec) * vec + t;
}

// Rows r and r + period have the same split.
MEGAMIX_HD int row_period(int64_t cols, int vec) {
  int g = 1;  // the largest power of two <= vec dividing cols (vec is a power of two)
  while (g < vec && cols % (2 * g) == 0) g *= 2;
  return vec / g;
}

// ------------------------------------------------------------------------------------------
// The forward's launch shape: one CTA per row; thread t keeps vectors t + i * threads (i <
// fwd_cache_vecs) in registers and re-reads the rest (k >= fwd_cache_vecs * threads: rows longer
// than 16384 columns) after the reduction; scalar slot t < nscalar holds a head or tail column.

constexpr int kFwdMaxThreads = 1024;
constexpr int kFwdCacheElems = 16;  // row elements per thread held in registers

MEGAMIX_HD constexpr int fwd_cache_vecs(int vec) { return kFwdCacheElems / vec; }

inline int fwd_threads(int64_t cols, int vec) {
  const int64_t per_thread = fwd_cache_vecs(vec);
  const int64_t wanted = (cols / vec + per_thread - 1) / per_thread;
  const int64_t rounded = (wanted + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(rounded < kWarp ? kWarp : (rounded > kFwdMaxThreads ? kFwdMaxThreads : rounded));
}

// Vectors of a row whose weight (and bias) the CTA stages in shared memory: those in registers.
MEGAMIX_HD int fwd_cached_vecs(int nvec, int threads, int vec) {
  const int most = fwd_cache_vecs(vec) * threads;
  return nvec < most ? nvec : most;
}

// Floats of staged weight (or bias): slot_index over the cached vectors, then 2 * vec scalars.
MEGAMIX_HD int fwd_param_floats(int cached, int vec) { return cached * vec + 2 * vec; }

// ------------------------------------------------------------------------------------------
// The backward's launch shape.
//
// A CTA holds `groups` row groups of `tpr` threads; group g of CTA (x, y) walks the rows
//   r = cls + period * ((bidx + j * blocks_per_class) * groups + g),  j = 0, 1, ...
// with cls = x mod period, bidx = x / period, prefetching row j + 1 while it computes row j.
// Thread t of a group owns, in every row, vectors k = win_begin + t + i * tpr (i < vpt) of window
// y (win_begin = y * tpr * vpt) and, in window 0, scalar slot t (t < nscalar).  Rows up to
// kBwdMaxThreads * kBwdElems = 8192 columns fit one window: the CTA reduces each row's two sums
// itself.  Longer rows are cut into `windows` column windows (grid.y): a first launch writes each
// window's partial row sums, a second adds them in window order and computes the gradients.
// The next row travels by cp.async into a per-thread staging area in shared memory.
// dweight/dbias: each group sums its rows (dweight in registers, dbias in shared memory), the
// groups of a CTA are added in group order through shared memory, CTA x writes row x of a
// [grid, cols] partial, and a second kernel adds the rows in a fixed order: the result depends
// only on the shape and the device.
struct BwdShape {
  int vec = 1;
  int vpt = 1;               // vectors per thread
  int period = 1;            // row classes
  int windows = 1;           // column windows (grid.y)
  int tpr = kWarp;           // threads per row group
  int groups = 1;            // row groups per CTA
  int threads = kWarp;       // tpr * groups
  int blocks_per_class = 1;  // CTAs per row class
  int grid = 1;              // grid.x = period * blocks_per_class = rows of the partial sums
  int stage_bytes = 0;       // per thread: kBwdElems elements of s and of dy, mean and rstd
  int smem_bytes = 0;
  int64_t sums_offset = 0;        // floats before the per-window row sums in the workspace
  int64_t workspace_floats = 0;
};

MEGAMIX_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shared memory of a backward CTA, in floats, as offsets:
//   [0, w)             the next row's s and dy of every thread, as cp.async lands them:
//                      16-byte piece c of thread x at float4 index c * threads + x, then the
//                      row's (mean, rstd) for thread x at float2 index x
//   [w, w_sc)          the window's weights by slot (slot_index), fp32
//   [w_sc, exchange)   the scalar columns' weights (2 * vec)
//   [exchange, acc_b)  the row sums' exchange: [2 parities][warps of the CTA][2]
//   [acc_b, end)       with a bias: each group's dbias sums, [groups][slots * vec + 2 * vec]
struct BwdSmem {
  int w, w_sc, exchange, acc_b, acc_b_group, end;
};

MEGAMIX_HD BwdSmem bwd_smem(const BwdShape& sh, bool has_bias) {
  BwdSmem m;
  const int slots_floats = sh.tpr * sh.vpt * sh.vec;
  m.w = sh.threads * sh.stage_bytes / 4;
  m.w_sc = m.w + slots_floats;
  m.exchange = m.w_sc + 2 * sh.vec;
  m.acc_b = m.exchange + 2 * (sh.threads / kWarp) * 2;
  m.acc_b_group = slots_floats + 2 * sh.vec;
  m.end = m.acc_b + (has_bias ? sh.groups * m.acc_b_group : 0);
  return m;
}

inline int64_t bwd_smem_floats(const BwdShape& sh, bool has_bias) { return bwd_smem(sh, has_bias).end; }

// Shared-memory floats of a slot-indexed array (vectors of `vec` elements of every thread of a
// group): element e of slot q lives at (e / 4 * slots + q) * 4 + e % 4, so that the 16-byte
// accesses of a warp are contiguous (no bank conflicts).
MEGAMIX_HD int slot_index(int q, int e, int slots) { return ((e >> 2) * slots + q) * 4 + (e & 3); }

// The CTA shape for rows of `cols` columns (before the grid size is known).
inline BwdShape bwd_block_shape(int64_t rows, int64_t cols, int vec, bool has_bias, int s_size, int dy_size) {
  BwdShape sh;
  sh.vec = vec;
  sh.stage_bytes = kBwdElems * (s_size + dy_size) + 8;
  sh.vpt = kBwdElems / vec;
  sh.period = row_period(cols, vec);
  const int64_t nvec_max = cols / vec;  // the most vectors a row of any class has
  const int64_t per_window = static_cast<int64_t>(kBwdMaxThreads) * sh.vpt;
  sh.windows = nvec_max > per_window ? static_cast<int>(ceil_div(nvec_max, per_window)) : 1;
  const int64_t window_vecs = ceil_div(nvec_max, sh.windows);
  const int64_t tpr = ceil_div(ceil_div(window_vecs, sh.vpt), kWarp) * kWarp;
  sh.tpr = static_cast<int>(tpr < kWarp ? kWarp : tpr);
  int groups = kBwdMaxThreads / sh.tpr;
  if (groups > kBwdMaxGroups) groups = kBwdMaxGroups;
  const int64_t class_rows = ceil_div(rows, sh.period);  // rows of the largest class
  if (groups > class_rows) groups = static_cast<int>(class_rows);
  sh.groups = groups < 1 ? 1 : groups;
  sh.threads = sh.tpr * sh.groups;
  sh.smem_bytes = static_cast<int>(4 * bwd_smem_floats(sh, has_bias));
  return sh;
}

// The grid for `resident` CTAs per device (a persistent grid: one wave), and the workspace.
inline void bwd_grid(BwdShape* sh, int64_t rows, int64_t cols, int64_t resident, bool has_bias) {
  const int64_t class_rows = ceil_div(rows, sh->period);
  const int64_t needed = ceil_div(class_rows, sh->groups);
  int64_t per_class = resident / (static_cast<int64_t>(sh->period) * sh->windows);
  if (per_class > needed) per_class = needed;
  if (per_class < 1) per_class = 1;
  sh->blocks_per_class = static_cast<int>(per_class);
  sh->grid = static_cast<int>(per_class * sh->period);
  sh->sums_offset = static_cast<int64_t>(sh->grid) * cols * (has_bias ? 2 : 1);
  sh->workspace_floats = sh->sums_offset + (sh->windows > 1 ? rows * sh->windows * 2 : 0);
}

// Row visited at step j by group g of CTA x, or a value >= rows when there is none.
MEGAMIX_HD int64_t bwd_row(const BwdShape& sh, int x, int g, int64_t j) {
  const int cls = x % sh.period;
  const int64_t bidx = x / sh.period;
  return cls + static_cast<int64_t>(sh.period) * ((bidx + j * sh.blocks_per_class) * sh.groups + g);
}

// First vector of window y.
MEGAMIX_HD int64_t window_begin(const BwdShape& sh, int y) {
  return static_cast<int64_t>(y) * sh.tpr * sh.vpt;
}

}  // namespace layout
}  // namespace megamix
