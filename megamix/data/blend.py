"""Megatron's greedy blend, exact, without a Python loop per sample.

Sample ``k`` of a blend comes from dataset ``argmax_d (w_d·(k+1) - count_d)``, ties to the lowest
index, with ``count_d`` (int64) the samples taken from ``d`` so far and ``w`` float64 weights
summing to 1 (as :func:`megamix.config.parse_blend` normalizes them).  The rule only looks at what
came before, so a blend of N samples is a prefix of a blend of 2N.

The rule is inherently sequential: no closed form reproduces it (it is not a priority merge such
as Sainte-Laguë), and bit-exactness includes float64 rounding (``0.7·2 - 1 < 0.4`` decides a tie).
So the loop runs in a dozen lines of C, compiled on first use with the system compiler into a
per-user build directory (``MEGAMIX_BUILD_DIR``, else ``$XDG_CACHE_HOME/megamix`` or
``~/.cache/megamix``) and called through ctypes: ~10 ns per sample and dataset.  The C evaluates
the same IEEE double expression in the same order (``-ffp-contract=off``: no fused multiply-add),
so it equals the plain NumPy loop bit for bit.  Without a compiler the same loop runs in Python
(about a microsecond per sample and dataset; a warning says so, and the result is cached).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

from megamix.data import cache

log = logging.getLogger(__name__)

BLEND_RULE = "megatron-greedy-1"  # part of cache keys
CACHE_MIN_SAMPLES = 1 << 22  # shorter blends (36 MiB) are computed in memory

_C_SOURCE = r"""
#include <stdint.h>

/* Megatron's greedy blend for samples first .. first+count-1, continuing from counts[] (updated). */
void megamix_greedy_blend(const double *weights, int64_t num_datasets, int64_t first, int64_t count,
                          int64_t *counts, uint16_t *which, int64_t *within) {
    for (int64_t i = 0; i < count; i++) {
        double next = (double)(first + i + 1);
        int64_t best = 0;
        double best_error = weights[0] * next - (double)counts[0];
        for (int64_t d = 1; d < num_datasets; d++) {
            double error = weights[d] * next - (double)counts[d];
            best = error > best_error ? d : best;  /* selects, not branches: mispredictions */
            best_error = error > best_error ? error : best_error;  /* would triple the time */
        }
        which[i] = (uint16_t)best;
        within[i] = counts[best]++;
    }
}
"""
_C_FLAGS = ["-O2", "-shared", "-fPIC", "-ffp-contract=off"]
_helper: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable


def _build_dir() -> Path:
    explicit = os.environ.get("MEGAMIX_BUILD_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megamix"


def _compile(directory: Path) -> Path:
    tag = hashlib.sha256((_C_SOURCE + " ".join(_C_FLAGS) + sys.platform + platform.machine()).encode()).hexdigest()
    library = directory / f"greedy_blend-{tag[:16]}.so"
    if library.is_file():
        return library
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC)")
    directory.mkdir(parents=True, exist_ok=True)
    stem = f".greedy_blend-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    source, output = directory / f"{stem}.c", directory / f"{stem}.so"
    try:
        source.write_text(_C_SOURCE)
        done = subprocess.run([compiler, *_C_FLAGS, "-o", str(output), str(source)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(output, library)  # racing ranks each publish an identical library
    finally:
        source.unlink(missing_ok=True)
        output.unlink(missing_ok=True)
    return library


def _load_helper() -> ctypes.CDLL | None:
    global _helper
    if _helper is False:
        _helper = None
        errors = []
        for directory in (_build_dir(), Path(tempfile.gettempdir()) / f"megamix-{os.getuid()}"):
            try:
                lib = ctypes.CDLL(str(_compile(directory)))
                fn = lib.megamix_greedy_blend
                fn.restype = None
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
                _helper = lib
                break
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{directory}: {e}")
        if _helper is None:
            log.warning("megamix: blend helper not compiled (%s); blending in Python (slow, ~1 µs per "
                        "sample and dataset)", "; ".join(errors))
    return _helper


def _greedy_python(weights: np.ndarray, first: int, counts: np.ndarray, which: np.ndarray,
                   within: np.ndarray) -> None:
    """The fallback: the rule in plain Python floats (the same IEEE double operations as NumPy)."""
    w = [float(x) for x in weights]
    c = [int(x) for x in counts]
    datasets = range(1, len(w))
    picks, positions = [], []
    for k in range(first + 1, first + len(which) + 1):
        best, best_error = 0, w[0] * k - c[0]
        for d in datasets:
            error = w[d] * k - c[d]
            if error > best_error:
                best, best_error = d, error
        picks.append(best)
        positions.append(c[best])
        c[best] += 1
    which[:] = picks
    within[:] = positions
    counts[:] = c


def normalized(weights) -> np.ndarray:
    """float64 weights summing to 1: as given when they already do (as ``parse_blend`` returns
    them, which must not be normalized twice: that could change their last bit), else divided by
    their sum the way ``parse_blend`` does."""
    w = [float(x) for x in weights]
    if not w or any(not x > 0 for x in w):
        raise ValueError(f"blend weights must be positive, got {weights}")
    total = sum(w)
    if not math.isclose(total, 1.0, rel_tol=1e-12, abs_tol=0.0):
        w = [x / total for x in w]
    return np.asarray(w, dtype=np.float64)


def greedy_blend(weights, num_samples: int, *, first: int = 0, counts: np.ndarray | None = None,
                 which: np.ndarray | None = None, within: np.ndarray | None = None,
                 implementation: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples ``[first, first + num_samples)`` of the blend: (dataset of each: uint16, index of
    each within its dataset: int64, counts after them: int64).  ``counts`` are the counts before
    ``first`` (zeros by default); ``which``/``within`` may be given to fill (e.g. mapped files).
    ``implementation``: "auto" (C when it compiles), "c" or "python"."""
    w = normalized(weights)
    if len(w) > np.iinfo(np.uint16).max:
        raise ValueError(f"a blend of {len(w)} datasets; at most 65535")
    counts = np.zeros(len(w), dtype=np.int64) if counts is None else np.array(counts, dtype=np.int64)
    which = np.empty(num_samples, dtype=np.uint16) if which is None else which
    within = np.empty(num_samples, dtype=np.int64) if within is None else within
    assert which.dtype == np.uint16 and within.dtype == np.int64 and len(which) == len(within) == num_samples
    helper = None if implementation == "python" else _load_helper()
    if implementation == "c" and helper is None:
        raise OSError("the C blend helper is unavailable")
    if num_samples == 0:
        return which, within, counts
    if helper is not None:
        assert which.flags.c_contiguous and within.flags.c_contiguous
        helper.megamix_greedy_blend(w.ctypes.data, len(w), first, num_samples, counts.ctypes.data,
                                    which.ctypes.data, within.ctypes.data)
    else:
        for a in range(0, num_samples, 1 << 20):  # bounded lists
            b = min(a + (1 << 20), num_samples)
            _greedy_python(w, first + a, counts, which[a:b], within[a:b])
    return which, within, counts


def blend_index(weights, num_samples: int, cache_dir: str | os.PathLike | None = None, *,
                collective: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(which, within, counts) of the first ``num_samples`` samples: mapped from the cache when
    ``cache_dir`` is given and the blend is long (a 77M-sample index is 770 MB; every rank maps one
    copy), computed in memory otherwise.  Counts are per dataset over those samples."""
    w = normalized(weights)
    if cache_dir is None or num_samples < CACHE_MIN_SAMPLES:
        return greedy_blend(w, num_samples)
    key = {"kind": "blend", "rule": BLEND_RULE, "weights": [x.hex() for x in w.tolist()], "samples": num_samples}
    path = cache.entry_path(cache_dir, f"blend{len(w)}-{num_samples}", key)

    def build(directory: Path) -> dict:
        which = cache.new_array(directory, "which", np.uint16, (num_samples,))
        within = cache.new_array(directory, "within", np.int64, (num_samples,))
        _, _, counts = greedy_blend(w, num_samples, which=which, within=within)
        which.flush()
        within.flush()
        return {"counts": counts.tolist()}

    arrays, meta = cache.open_or_build(path, key, build, collective=collective)
    return arrays["which"], arrays["within"], np.asarray(meta["counts"], dtype=np.int64)


def blend_length(weights, lengths: list[int], limit: int | None = None) -> int:
    """How many samples the blend of datasets of ``lengths`` samples gives before one runs out
    (at most ``limit``): the greedy rule keeps every count within one of ``w_d·k``, so dataset d
    is exhausted by ``k = (lengths[d] + 1) / w_d + 1``."""
    w = normalized(weights)
    bound = min(int((n + 1) / x) + 2 for n, x in zip(lengths, w.tolist()))
    if limit is not None:
        bound = min(bound, limit)
    which, within, _ = greedy_blend(w, bound)
    short = np.nonzero(within >= np.asarray(lengths, dtype=np.int64)[which])[0]
    return int(short[0]) if len(short) else bound
