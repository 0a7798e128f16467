"""The CUDA kernels' index arithmetic and reduction order, emulated on a CPU.

No GPU runs here, so the part of the kernels a CPU can check is checked this way: g++ compiles the
very header the kernels include (``csrc/fused_norm_layout.h``: row splits into an aligned vector
body and scalar head/tail, row classes, the backward's CTA shape and row walk, shared-memory slot
layout) into a small library, and a NumPy emulation drives fp32 arithmetic through it in the
kernels' order:

- forward: one CTA per row, each thread's cached vectors, the re-read tail, its scalar column, the
  two-level butterfly reduction;
- backward: CTAs of row groups walking the rows of one class, each thread's 8 elements per row,
  the group's butterfly + fixed-order reduction of the row sums, column windows for rows past
  8192 columns (per-window partial sums added in window order), dweight/dbias summed in
  registers per group, groups added in order, CTAs' partials reduced by the second kernel's
  8-row tiles.

Each emulated run checks coverage (every element read, written and reduced exactly once), that
every vector access is 16-byte aligned, that the launch shape is legal (warp multiples, <= 1024
threads, <= 8 groups, shared memory within an H100's), and compares y, the input gradient and
dweight/dbias with the formulas in fp64, for awkward sizes.  What it cannot check: the CUDA code
itself uses these functions as the emulation does (tests/gpu does, on a GPU), FMA contraction,
and timing.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
WARP = 32
H100_SMEM = 227 * 1024

SHIM = r"""
#include "fused_norm_layout.h"
using namespace megamix::layout;

static BwdShape from_fields(const long long* f) {
  BwdShape sh;
  sh.vec = f[0]; sh.vpt = f[1]; sh.period = f[2]; sh.windows = f[3]; sh.tpr = f[4];
  sh.groups = f[5]; sh.threads = f[6]; sh.blocks_per_class = f[7]; sh.grid = f[8];
  sh.stage_bytes = f[9]; sh.smem_bytes = f[10]; sh.sums_offset = f[11]; sh.workspace_floats = f[12];
  return sh;
}

extern "C" {
void mm_split_row(long long row, long long cols, int vec, int phase, int* out) {
  const RowSplit s = split_row(row, cols, vec, phase);
  out[0] = s.head; out[1] = s.nvec; out[2] = s.nscalar;
}
long long mm_scalar_col(int t, int head, int nvec, int nscalar, int vec) {
  RowSplit s; s.head = head; s.nvec = nvec; s.nscalar = nscalar;
  return scalar_col(t, s, vec);
}
long long mm_vector_col(long long k, int head, int vec) {
  RowSplit s; s.head = head; s.nvec = 0; s.nscalar = 0;
  return vector_col(k, s, vec);
}
int mm_row_period(long long cols, int vec) { return row_period(cols, vec); }
int mm_slot_index(int q, int e, int slots) { return slot_index(q, e, slots); }
int mm_fwd_threads(long long cols, int vec) { return fwd_threads(cols, vec); }
int mm_fwd_cache_vecs(int vec) { return fwd_cache_vecs(vec); }
int mm_fwd_cached_vecs(int nvec, int threads, int vec) { return fwd_cached_vecs(nvec, threads, vec); }
void mm_bwd_shape(long long rows, long long cols, int vec, int has_bias, int s_size, int dy_size,
                  long long resident, long long* f) {
  BwdShape sh = bwd_block_shape(rows, cols, vec, has_bias != 0, s_size, dy_size);
  bwd_grid(&sh, rows, cols, resident, has_bias != 0);
  f[0] = sh.vec; f[1] = sh.vpt; f[2] = sh.period; f[3] = sh.windows; f[4] = sh.tpr;
  f[5] = sh.groups; f[6] = sh.threads; f[7] = sh.blocks_per_class; f[8] = sh.grid;
  f[9] = sh.stage_bytes; f[10] = sh.smem_bytes; f[11] = sh.sums_offset; f[12] = sh.workspace_floats;
}
long long mm_bwd_row(const long long* f, int x, int g, long long j) { return bwd_row(from_fields(f), x, g, j); }
long long mm_window_begin(const long long* f, int y) { return window_begin(from_fields(f), y); }
}
"""

FIELDS = ("vec", "vpt", "period", "windows", "tpr", "groups", "threads", "blocks_per_class", "grid",
          "stage_bytes", "smem_bytes", "sums_offset", "workspace_floats")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    out = tmp_path_factory.mktemp("layout")
    (out / "shim.cpp").write_text(SHIM)
    so = out / "liblayout.so"
    proc = subprocess.run([gxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                           f"-I{CSRC}", str(out / "shim.cpp"), "-o", str(so)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return Layout(ctypes.CDLL(str(so)))


class Layout:
    """ctypes front of the compiled header."""

    def __init__(self, so):
        self.so = so
        ll, i = ctypes.c_longlong, ctypes.c_int
        for name, res, args in (
            ("mm_scalar_col", ll, [i, i, i, i, i]), ("mm_vector_col", ll, [ll, i, i]),
            ("mm_row_period", i, [ll, i]), ("mm_slot_index", i, [i, i, i]), ("mm_fwd_threads", i, [ll, i]),
            ("mm_fwd_cache_vecs", i, [i]), ("mm_fwd_cached_vecs", i, [i, i, i]),
            ("mm_bwd_row", ll, [ctypes.POINTER(ll), i, i, ll]), ("mm_window_begin", ll, [ctypes.POINTER(ll), i]),
        ):
            getattr(so, name).restype, getattr(so, name).argtypes = res, args
        so.mm_split_row.argtypes = [ll, ll, i, i, ctypes.POINTER(i)]
        so.mm_bwd_shape.argtypes = [ll, ll, i, i, i, i, ll, ctypes.POINTER(ll)]

    def split(self, row, cols, vec, phase):
        out = (ctypes.c_int * 3)()
        self.so.mm_split_row(row, cols, vec, phase, out)
        return tuple(out)

    def scalar_col(self, t, split, vec):
        return self.so.mm_scalar_col(t, *split, vec)

    def vector_col(self, k, split, vec):
        return self.so.mm_vector_col(k, split[0], vec)

    def bwd_shape(self, rows, cols, vec, has_bias, s_size, dy_size, resident):
        f = (ctypes.c_longlong * len(FIELDS))()
        self.so.mm_bwd_shape(rows, cols, vec, int(has_bias), s_size, dy_size, resident, f)
        return Shape(dict(zip(FIELDS, f)), f)

    def bwd_row(self, shape, x, g, j):
        return self.so.mm_bwd_row(shape.raw, x, g, j)

    def window_begin(self, shape, y):
        return self.so.mm_window_begin(shape.raw, y)


@dataclass
class Shape:
    f: dict
    raw: object

    def __getattr__(self, name):
        return self.__dict__["f"][name]


f32 = np.float32


def butterfly(v):
    """Warp butterflies (__shfl_xor_sync) over the last axis of 32 lanes, in fp32."""
    v = v.astype(f32).copy()
    lanes = np.arange(WARP)
    for offset in (16, 8, 4, 2, 1):
        v = (v + v[..., lanes ^ offset]).astype(f32)
    return v


def seq_sum(values):
    """Sum in the given order, rounding to fp32 after every addition."""
    acc = f32(0)
    for v in values:
        acc = f32(acc + f32(v))
    return acc


# ---------------------------------------------------------------------------------------------
# forward


def fwd_row_indices(lib, row, cols, vec, phase):
    """Per thread of the row's CTA: its cached vectors' first columns (-1: none), its tail vectors,
    its scalar column (-1: none), all from the header's functions."""
    threads = lib.so.mm_fwd_threads(cols, vec)
    kvecs = lib.so.mm_fwd_cache_vecs(vec)
    split = lib.split(row, cols, vec, phase)
    nvec = split[1]
    cached = np.full((threads, kvecs), -1, dtype=np.int64)
    for i in range(kvecs):
        for t in range(threads):
            k = t + i * threads
            if k < nvec:
                cached[t, i] = lib.vector_col(k, split, vec)
    tail = [[lib.vector_col(k, split, vec) for k in range(kvecs * threads + t, nvec, threads)] for t in range(threads)]
    scalar = np.array([lib.scalar_col(t, split, vec) if t < split[2] else -1 for t in range(threads)])
    return threads, split, cached, tail, scalar


def emulate_fwd_row(lib, v_row, w, b, rms, eps, scale, row, vec, phase):
    """y of one row and its (mean, rstd), in the kernel's order of fp32 operations."""
    cols = v_row.shape[0]
    threads, split, cached, tail, scalar = fwd_row_indices(lib, row, cols, vec, phase)
    seen = np.zeros(cols, dtype=int)
    elems = []  # per thread: the columns it holds, in its order of accumulation
    for t in range(threads):
        mine = [c + e for c in cached[t] if c >= 0 for e in range(vec)]
        mine += [c + e for c in tail[t] for e in range(vec)]
        if scalar[t] >= 0:
            mine.append(int(scalar[t]))
        for c in mine:
            seen[c] += 1
        elems.append(mine)
    for t in range(threads):  # every vector access is aligned: element index ≡ phase (mod vec)
        for c in list(cached[t][cached[t] >= 0]) + tail[t]:
            assert (row * cols + c - phase) % vec == 0
    assert (seen == 1).all(), "every column exactly once"

    def block_sum(per_thread):
        warp_sums = butterfly(per_thread.reshape(-1, WARP))[:, 0]
        lanes = np.zeros(WARP, dtype=f32)
        lanes[: warp_sums.shape[0]] = warp_sums
        return butterfly(lanes)[0]

    width = max(len(mine) for mine in elems)
    order = np.full((threads, width), -1, dtype=np.int64)  # each thread's columns, in its order
    for t, mine in enumerate(elems):
        order[t, : len(mine)] = mine
    valid = order >= 0

    def thread_sums(values):  # per thread, adding its elements one by one in fp32
        v = values[np.where(valid, order, 0)]
        acc = np.zeros(threads, dtype=f32)
        for e in range(width):
            acc = np.where(valid[:, e], acc + v[:, e], acc).astype(f32)
        return acc

    x = v_row.astype(f32)
    inv_cols = f32(1 / f32(cols))
    if rms:
        mean = f32(0)
        rstd = f32(1 / np.sqrt(f32(f32(block_sum(thread_sums((x * x).astype(f32))) * inv_cols) + f32(eps))))
    else:
        mean = f32(block_sum(thread_sums(x)) * inv_cols)
        var = thread_sums(((x - mean) * (x - mean)).astype(f32))
        rstd = f32(1 / np.sqrt(f32(f32(block_sum(var) * inv_cols) + f32(eps))))
    y = (((x - mean) * rstd * w.astype(f32) + (b.astype(f32) if b is not None else f32(0))) * f32(scale))
    return y.astype(f32), mean, rstd


# ---------------------------------------------------------------------------------------------
# backward


def emulate_bwd(lib, s, dy, ds, w, mean, rstd, rms, scale, has_bias, vec, phase=0, resident=264,
                s_size=4, dy_size=2):
    """(dnorm, dweight, dbias, shape) in the backward's order of fp32 operations, with coverage
    and alignment asserted along the way."""
    rows, cols = s.shape
    sh = lib.bwd_shape(rows, cols, vec, has_bias, s_size, dy_size, resident)
    assert sh.vpt * sh.vec == 8 and sh.tpr % WARP == 0 and sh.threads <= 1024 and 1 <= sh.groups <= 8
    assert sh.threads == sh.tpr * sh.groups and sh.smem_bytes <= H100_SMEM
    assert sh.grid == sh.period * sh.blocks_per_class
    s, dy, w = s.astype(f32), dy.astype(f32), w.astype(f32)
    ds = ds.astype(f32) if ds is not None else np.zeros_like(s)
    mean = mean.astype(f32) if mean is not None else np.zeros(rows, dtype=f32)
    scale, inv_cols = f32(scale), f32(1 / f32(cols))
    W, vpt, tpr = sh.windows, sh.vpt, sh.tpr

    # Who owns what: per (class, window), each thread's vector columns and scalar column.
    owners = {}
    for cls in range(sh.period):
        split = lib.split(cls, cols, vec, phase)
        for row in range(cls, rows, sh.period):  # every row of a class has the class's split
            assert lib.split(row, cols, vec, phase) == split
        for y in range(W):
            begin = lib.window_begin(sh, y)
            cols_of = np.full((tpr, vpt, vec), -1, dtype=np.int64)
            for t in range(tpr):
                for i in range(vpt):
                    k = begin + t + i * tpr
                    if k < split[1]:
                        c0 = lib.vector_col(k, split, vec)
                        cols_of[t, i] = np.arange(c0, c0 + vec)
            scal = np.array([lib.scalar_col(t, split, vec) if (y == 0 and t < split[2]) else -1 for t in range(tpr)])
            owners[cls, y] = cols_of, scal
        covered = np.concatenate([np.concatenate([o[0][o[0] >= 0], o[1][o[1] >= 0]]) for (c, _), o in owners.items()
                                  if c == cls])
        assert np.array_equal(np.sort(covered), np.arange(cols)), "each column owned once per class"

    # The row walk: every row visited exactly once, by a group of a CTA of its class.
    visits = {}
    for x in range(sh.grid):
        for g in range(sh.groups):
            j, walk = 0, []
            while (row := lib.bwd_row(sh, x, g, j)) < rows:
                assert row % sh.period == x % sh.period
                walk.append(row)
                j += 1
            visits[x, g] = walk
    all_rows = sorted(r for walk in visits.values() for r in walk)
    assert all_rows == list(range(rows)), "every row exactly once"

    def thread_terms(row, cols_of, scal):
        """Per thread: its elements' x̂, gout, g in its order (vectors i, e; then the scalar)."""
        idx = np.concatenate([cols_of.reshape(tpr, -1), scal[:, None]], axis=1)  # -1: absent
        valid = idx >= 0
        c = np.where(valid, idx, 0)
        xhat = ((s[row, c] - mean[row]) * rstd[row]).astype(f32)
        gout = (dy[row, c] * scale).astype(f32)
        g = (gout * w[c]).astype(f32)
        return idx, valid, xhat, gout, g

    def group_sums(row, y):
        """The row's two sums over window y, reduced as the group does: per thread in order, warp
        butterflies, then the warps' results in warp order."""
        cols_of, scal = owners[row % sh.period, y]
        idx, valid, xhat, gout, g = thread_terms(row, cols_of, scal)
        per_thread = np.zeros((2, tpr), dtype=f32)
        for e in range(idx.shape[1]):
            per_thread[0] = np.where(valid[:, e], per_thread[0] + g[:, e] * xhat[:, e], per_thread[0]).astype(f32)
            per_thread[1] = np.where(valid[:, e], per_thread[1] + g[:, e], per_thread[1]).astype(f32)
        warp_sums = butterfly(per_thread.reshape(2, -1, WARP))[:, :, 0]
        return np.array([seq_sum(warp_sums[0]), seq_sum(warp_sums[1])], dtype=f32)

    sums = np.zeros((rows, 2), dtype=f32)
    for r in range(rows):
        if W == 1:
            sums[r] = group_sums(r, 0)
        else:  # first launch: per-window partials; second: added in window order
            parts = [group_sums(r, y) for y in range(W)]
            sums[r] = [seq_sum(p[0] for p in parts), seq_sum(p[1] for p in parts)]

    dnorm = np.full_like(s, np.nan)
    written = np.zeros(s.shape, dtype=int)
    partial_w = np.full((sh.grid, cols), np.nan, dtype=f32)
    partial_b = np.full((sh.grid, cols), np.nan, dtype=f32)
    for x in range(sh.grid):
        cls = x % sh.period
        for y in range(W):
            cols_of, scal = owners[cls, y]
            idx = np.concatenate([cols_of.reshape(tpr, -1), scal[:, None]], axis=1)
            valid = idx >= 0
            acc = np.zeros((sh.groups, 2) + idx.shape, dtype=f32)  # [group][w, b][thread][element]
            for g in range(sh.groups):
                for row in visits[x, g]:
                    _, _, xhat, gout, gg = thread_terms(row, cols_of, scal)
                    acc[g, 0] = np.where(valid, acc[g, 0] + gout * xhat, acc[g, 0]).astype(f32)
                    acc[g, 1] = np.where(valid, acc[g, 1] + gout, acc[g, 1]).astype(f32)
                    c1 = f32(sums[row, 0] * inv_cols)
                    c0 = f32(0) if rms else f32(sums[row, 1] * inv_cols)
                    d = (rstd[row] * (gg - c0 - xhat * c1) + ds[row, np.where(valid, idx, 0)]).astype(f32)
                    starts = idx[:, : vpt * vec : vec]  # vector accesses: aligned element indices
                    starts = starts[starts >= 0]
                    assert ((row * cols + starts - phase) % vec == 0).all()
                    dnorm[row, idx[valid]] = d[valid]
                    written[row] += np.bincount(idx[valid], minlength=cols)
            total = acc[0]
            for g in range(1, sh.groups):  # groups added in group order
                total = (total + acc[g]).astype(f32)
            partial_w[x, idx[valid]] = total[0][valid]
            partial_b[x, idx[valid]] = total[1][valid]
    assert (written == 1).all(), "every gradient element written exactly once"
    assert not np.isnan(partial_w).any(), "every CTA writes its whole partial row"

    def reduce_partials(partial):  # reduce_partials_kernel: 8 strided sums per column, then the 8
        tiles = [np.zeros(cols, dtype=f32) for _ in range(8)]
        for ty in range(8):
            for bb in range(ty, sh.grid, 8):
                tiles[ty] = (tiles[ty] + partial[bb]).astype(f32)
        out = np.zeros(cols, dtype=f32)
        for ty in range(8):
            out = (out + tiles[ty]).astype(f32)
        return out

    return dnorm, reduce_partials(partial_w), reduce_partials(partial_b) if has_bias else None, sh


# ---------------------------------------------------------------------------------------------
# references and tests


def reference(x, w, b, dy, ds, rms, eps, scale):
    """y, the input gradient, dweight, dbias from the formulas, fp64, by autograd-free algebra."""
    x, w, dy = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    n = x.shape[1]
    centered = x if rms else x - x.mean(1, keepdims=True)
    rstd = 1 / np.sqrt((centered**2).mean(1, keepdims=True) + eps)
    xhat = centered * rstd
    y = (xhat * w + (b if b is not None else 0)) * scale
    gout = dy * scale
    g = gout * w
    dx = rstd * (g - xhat * (g * xhat).mean(1, keepdims=True) - (0 if rms else g.mean(1, keepdims=True)))
    dx = dx + (ds if ds is not None else 0)
    return y, dx, (gout * xhat).sum(0), gout.sum(0), (x.mean(1) if not rms else None), rstd[:, 0], n


def inputs(rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 2 + 0.3).astype(f32)
    w = (1 + 0.2 * rng.standard_normal(cols)).astype(f32)
    b = (0.1 * rng.standard_normal(cols)).astype(f32)
    dy = rng.standard_normal((rows, cols)).astype(f32)
    ds = rng.standard_normal((rows, cols)).astype(f32)
    return x, w, b, dy, ds


def close(got, want, rtol=2e-5):
    scale = np.abs(want).max() + 1e-30
    err = np.abs(got.astype(np.float64) - want).max() / scale
    assert err < rtol, f"relative error {err:.3g}"


def test_split_and_scalar_columns_cover_every_row(lib):
    for cols in (1, 2, 7, 8, 9, 15, 16, 17, 4095, 4096, 8193, 12288):
        for vec in (4, 8):
            assert lib.so.mm_row_period(cols, vec) == vec // np.gcd(cols, vec)
            for phase in range(vec):
                for row in range(2 * vec + 1):
                    split = head, nvec, nscalar = lib.split(row, cols, vec, phase)
                    assert 0 <= head < vec and head <= cols and 0 <= nscalar < 2 * vec
                    ks = sorted(k for k in {0, 1, nvec // 2, nvec - 1} if 0 <= k < nvec)
                    assert [lib.vector_col(k, split, vec) for k in ks] == [head + k * vec for k in ks]
                    seen = np.zeros(cols, dtype=int)
                    seen[head: head + nvec * vec] += 1
                    for t in range(nscalar):
                        seen[lib.scalar_col(t, split, vec)] += 1
                    assert (seen == 1).all()
                    if nvec:  # the body starts on an aligned element (global index ≡ phase mod vec)
                        assert (row * cols + head - phase) % vec == 0
                        assert (cols - head - nvec * vec) < vec


def test_slot_index_is_a_permutation_with_contiguous_16_byte_pieces(lib):
    for slots in (32, 96, 1024):
        for vec in (4, 8):
            got = [lib.so.mm_slot_index(q, e, slots) for q in range(slots) for e in range(vec)]
            assert sorted(got) == list(range(slots * vec))
            # the same 4-element piece of consecutive slots is contiguous: conflict-free LDS.128
            assert lib.so.mm_slot_index(1, 0, slots) - lib.so.mm_slot_index(0, 0, slots) == 4


@pytest.mark.parametrize("cols", [1, 7, 64, 4095, 8193, 12288, 20480])
@pytest.mark.parametrize("vec", [8, 4])
def test_backward_shape_is_legal(lib, cols, vec):
    for rows in (1, 3, 1000, 65536):
        for has_bias in (False, True):
            sh = lib.bwd_shape(rows, cols, vec, has_bias, 4, 4, 132 * 2)
            assert sh.tpr % WARP == 0 and sh.threads <= 1024 and 1 <= sh.groups <= 8
            assert sh.windows * sh.tpr * sh.vpt >= cols // vec, "windows cover the row"
            assert sh.smem_bytes <= 160 * 1024, "fits an A100's 163 KiB"
            assert sh.grid * sh.windows <= max(132 * 2, sh.period * sh.windows)
            if cols <= 8192:
                assert sh.windows == 1
    assert lib.bwd_shape(1000, 4096, 8, False, 4, 2, 264).groups == 2  # several rows per CTA
    assert lib.bwd_shape(1000, 1024, 8, False, 4, 2, 264).groups == 8


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("cols", [1, 7, 4095, 8193, 12288])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("vec,phase", [(8, 0), (8, 3), (4, 1)])
def test_backward_emulation_matches_the_formulas(lib, kind, cols, rows, vec, phase):
    rms = kind == "rms"
    x, w, b, dy, ds = inputs(rows, cols, seed=cols + rows)
    scale, eps = 0.7, 1e-6
    want_y, want_dx, want_dw, want_db, mean, rstd, _ = reference(x, w, b if not rms else None, dy, ds, rms, eps, scale)
    dnorm, dw, db, sh = emulate_bwd(lib, x, dy, ds, w, None if rms else mean, rstd.astype(f32), rms, scale,
                                    has_bias=not rms, vec=vec, phase=phase, resident=7)
    close(dnorm, want_dx, 5e-5)
    close(dw, want_dw)
    if not rms:
        close(db, want_db)
    assert sh.windows == max(1, -(-(cols // vec) // (1024 * sh.vpt)))
    if cols == 12288:
        assert sh.windows == 2  # two launches: partial row sums per window, then the gradients


@pytest.mark.parametrize("cols,vec,phase,kind", [
    (1, 8, 0, "layer"), (7, 8, 3, "rms"), (4095, 8, 0, "layer"), (1000, 4, 1, "rms"), (8193, 8, 0, "rms"),
    (12288, 8, 0, "layer"),
])
def test_backward_emulation_many_rows(lib, cols, vec, phase, kind):
    """1000 rows over a grid of several CTAs per class and groups per CTA: the row walk, the
    group order, the windows and the two-stage dweight/dbias reduction."""
    rows, rms = 1000, kind == "rms"
    x, w, b, dy, ds = inputs(rows, cols, seed=5)
    want = reference(x, w, None if rms else b, dy, ds, rms, 1e-6, 1.0)
    dnorm, dw, db, sh = emulate_bwd(lib, x, dy, ds, w, None if rms else want[4], want[5].astype(f32), rms, 1.0,
                                    not rms, vec, phase=phase, resident=33)
    assert sh.grid > 1
    close(dnorm, want[1], 5e-5)
    close(dw, want[2])
    if not rms:
        close(db, want[3])


@pytest.mark.parametrize("cols", [1, 7, 4095, 8193, 12288, 20481])
@pytest.mark.parametrize("vec,phase", [(8, 0), (8, 5), (4, 2)])
def test_forward_emulation_matches_the_formulas(lib, cols, vec, phase):
    rows = 3
    x, w, b, _, _ = inputs(rows, cols, seed=cols)
    for rms in (True, False):
        want_y, *_ , mean, rstd, _ = reference(x, w, None if rms else b, x, None, rms, 1e-6, 0.5)
        for row in range(rows):
            y, m, r = emulate_fwd_row(lib, x[row], w, None if rms else b, rms, 1e-6, 0.5, row, vec, phase)
            close(y, want_y[row])
            assert abs(r - rstd[row]) <= 1e-5 * rstd[row]
