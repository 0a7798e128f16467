"""The training-data index at C4 scale: start time and memory per rank, v0.1 vs now vs Megatron-Core.

Writes a synthetic corpus the size of C4 (or 1/10 of it): an ``.idx`` whose document lengths are
drawn like C4's (lognormal, median 300 tokens: mu = ln 300 = 5.704, sigma = sqrt(2 ln(465/300)) =
0.936, so mean 465; rounded and clipped to [1, 100000]) and a sparse ``.bin`` of the matching size
(``truncate``: no disk blocks, reads return zeros).  Full C4 is 365M documents (a 7.3 GB ``.idx``,
written in chunks; the ``.bin`` would be 340 GB and uses none).  Then, per scale, each in its own
child process so that memory is per measurement (times and memory from after the imports; USS =
Private_Clean + Private_Dirty of /proc/PID/smaps_rollup, of which "anonymous" is the part that is
no file's page cache; peak RSS = VmHWM after resetting it).  Note that a file page mapped by one
process only counts as that process's Private_Clean: in a one-process measurement the mapped index
shows up in USS, where with 8 ranks on a node mapping the same file it is shared):

- v0.1 (rebuilt per start): the ``GPTDataset`` of commit aee8f11, copied below verbatim, building
  its index for 76.8M samples of 256 tokens (what every rank did at every start);
- megamix, first start: ``build_dataset`` with a cache directory (builds and writes the epoch);
- megamix, cached start: the same call once the cache exists (maps it), and reading one sample;
- Megatron-Core: its ``GPTDataset`` through ``BlendedMegatronDatasetBuilder`` with
  ``path_to_cache``: the first (building) and a cached start;
- the step loader's throughput (samples/s) with 0 and 2 workers over the cached index.

Cached starts of megamix and Megatron-Core are interleaved and repeated (median of 3).  A
measurement that would exhaust this machine's memory (available memory below 1.5 GiB: others share
the machine) is stopped and reported as not fitting.  Usage::

    python benchmarks/data_scale.py --scales 0.1        # 1/10 of C4 only (a few minutes)
    python benchmarks/data_scale.py                     # 1/10 and full C4 (much longer; ~25 GB disk)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL_C4_DOCS = 365_000_000
SAMPLES = 76_800_000
SEQ = 256
SEED = 1234
MU, SIGMA = float(np.log(300.0)), float(np.sqrt(2 * np.log(465.0 / 300.0)))
CHUNK = 1 << 24


# ----------------------------------------------------------------------------------------------
# The synthetic corpus

def write_corpus(prefix: str, num_docs: int) -> dict:
    """Stream a C4-like ``.idx`` (lengths, offsets, document indices, one pass each) and a sparse
    ``.bin``; returns its size in documents and tokens."""
    from megamix.data.indexed import CODE_OF_DTYPE, MAGIC, VERSION

    dtype = np.dtype(np.uint16)
    idx = prefix + ".idx"
    with open(idx, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF_DTYPE[dtype]))
        f.write(struct.pack("<QQ", num_docs, num_docs + 1))
        tokens = 0
        for c, lo in enumerate(range(0, num_docs, CHUNK)):
            n = min(CHUNK, num_docs - lo)
            rng = np.random.default_rng([SEED, c])
            lengths = np.clip(np.rint(rng.lognormal(MU, SIGMA, n)), 1, 100_000).astype(np.int32)
            tokens += int(lengths.sum(dtype=np.int64))
            f.write(lengths.tobytes())
        header = 34
        carry = 0
        for lo in range(0, num_docs, CHUNK):  # byte offsets, from the lengths just written
            n = min(CHUNK, num_docs - lo)
            lengths = np.fromfile(idx, dtype=np.int32, count=n, offset=header + 4 * lo).astype(np.int64)
            pointers = np.empty(n, dtype=np.int64)
            pointers[0] = carry
            np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
            pointers[1:] += carry
            carry = int(pointers[-1] + lengths[-1] * dtype.itemsize)
            f.write(pointers.tobytes())
        for lo in range(0, num_docs + 1, CHUNK):
            f.write(np.arange(lo, min(lo + CHUNK, num_docs + 1), dtype=np.int64).tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(tokens * dtype.itemsize)
    return {"documents": num_docs, "tokens": tokens}


# ----------------------------------------------------------------------------------------------
# v0.1's index, verbatim from megamix/data/gpt_dataset.py at commit aee8f11

class V01GPTDataset:
    def __init__(self, indexed, documents: np.ndarray, seq_len: int, num_samples: int, seed: int,
                 shuffle: bool = True):
        self.indexed = indexed
        self.seq_len = seq_len
        lengths = indexed.sequence_lengths[documents].astype(np.int64)
        tokens_per_epoch = int(lengths.sum())
        if tokens_per_epoch <= seq_len:
            raise ValueError(
                f"{indexed.prefix}: {tokens_per_epoch} tokens in this split, fewer than one sample of {seq_len + 1}"
            )
        # Enough epochs for num_samples samples of seq_len new tokens each (+1 for the last target).
        num_epochs = max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))
        rng = np.random.default_rng(seed)
        orders = [rng.permutation(documents) if shuffle else documents for _ in range(num_epochs)]
        self.doc_order = np.concatenate(orders)
        self.doc_starts = np.zeros(len(self.doc_order) + 1, dtype=np.int64)
        np.cumsum(indexed.sequence_lengths[self.doc_order], out=self.doc_starts[1:])
        total_tokens = int(self.doc_starts[-1])
        available = (total_tokens - 1) // seq_len
        self.num_samples = min(num_samples, available) if num_samples else available
        # Shuffle samples within each epoch, so epoch e's samples all come before epoch e+1's.
        starts = np.arange(self.num_samples, dtype=np.int64) * seq_len
        epoch_of = np.minimum(starts // tokens_per_epoch, num_epochs - 1)
        self.sample_order = np.arange(self.num_samples, dtype=np.int64)
        if shuffle:
            for e in range(num_epochs):
                (members,) = np.nonzero(epoch_of == e)
                self.sample_order[members] = members[rng.permutation(len(members))]

    def tokens(self, i: int) -> np.ndarray:
        start = int(self.sample_order[i]) * self.seq_len
        end = start + self.seq_len + 1
        d = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        pieces = []
        while start < end:
            doc = int(self.doc_order[d])
            offset = start - int(self.doc_starts[d])
            take = min(end - start, int(self.doc_starts[d + 1]) - start)
            pieces.append(self.indexed.get(doc, offset, take))
            start += take
            d += 1
        return np.concatenate(pieces)


# ----------------------------------------------------------------------------------------------
# Child processes: one measurement each

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _rollup_kib(*fields: str) -> int:
    total = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(tuple(f + ":" for f in fields)):
            total += int(line.split()[1])
    return total


def _uss_kib() -> int:
    return _rollup_kib("Private_Clean", "Private_Dirty")


class MockTokenizer:
    """The little Megatron-Core's GPTDatasetConfig asks of a tokenizer (eod, vocab size, identity)."""

    vocab_size = 32000
    eod = 0

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "MockTokenizer"}


def megatron_dataset(prefix: str, cache_dir: str, num_samples: int):
    import logging
    import warnings

    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    config = GPTDatasetConfig(
        random_seed=SEED, sequence_length=SEQ, blend=([prefix], None), split="100,0,0",
        path_to_cache=cache_dir, tokenizer=MockTokenizer(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, mmap_bin_files=True,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, config).build()
    return train


def child(system: str, prefix: str, cache_dir: str, num_samples: int) -> dict:
    import torch  # noqa: F401  (imports excluded from every measurement)

    from megamix.data.gpt_dataset import build_dataset
    from megamix.data.indexed import IndexedDataset
    from megamix.data.loader import StepLoader

    if system == "megatron":  # its imports too are excluded from the measurement
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import megatron.core.datasets.blended_megatron_dataset_builder  # noqa: F401
            import megatron.core.datasets.gpt_dataset  # noqa: F401
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: peak RSS from here on
    rss0, uss0, anon0 = _status_kib("VmRSS"), _uss_kib(), _rollup_kib("Anonymous")
    extra = {}
    start = time.perf_counter()
    if system == "v0.1":
        indexed = IndexedDataset(prefix)
        ds = V01GPTDataset(indexed, np.arange(len(indexed)), SEQ, num_samples, SEED)
        ds.tokens(num_samples - 1)
    elif system == "open":
        IndexedDataset(prefix)
    elif system == "megamix":
        ds = build_dataset(prefix, "train", "100,0", SEQ, SEED, use_split=False, num_samples=num_samples,
                           cache_dir=cache_dir)
        ds.tokens(num_samples - 1)
    elif system == "megatron":
        ds = megatron_dataset(prefix, cache_dir, num_samples)
        ds[num_samples - 1]
    elif system.startswith("loader"):
        workers = int(system.split("-")[1])
        ds = build_dataset(prefix, "train", "100,0", SEQ, SEED, use_split=False, num_samples=num_samples,
                           cache_dir=cache_dir)
        G, steps = 256, 100
        with StepLoader(ds, num_samples // 2, G, 8, num_workers=workers, vocab_size=32000) as loader:
            for _ in range(2):
                loader.next_step()
            t = time.perf_counter()
            for _ in range(steps):
                loader.next_step()
            extra["samples_per_s"] = steps * G / (time.perf_counter() - t)
    else:
        raise SystemExit(f"unknown system {system}")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "uss_mib": (_uss_kib() - uss0) / 1024,
            "anon_mib": (_rollup_kib("Anonymous") - anon0) / 1024,
            "peak_rss_mib": (_status_kib("VmHWM") - rss0) / 1024, **extra}


# ----------------------------------------------------------------------------------------------
# The driver

def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


MEMORY_FLOOR_MIB = 1536  # a child is stopped when the machine's available memory falls below this


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(system: str, prefix: str, cache_dir: str, num_samples: int, timeout: int = 3600) -> dict:
    """One measurement in a child process.  A child that would exhaust the machine's memory (others
    share it) is killed first and reported as not fitting, rather than guessed at beforehand."""
    cmd = [sys.executable, __file__, "--child", system, "--prefix", prefix, "--cache", cache_dir,
           "--samples", str(num_samples)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
        deadline, peak = time.monotonic() + timeout, 0.0
        while proc.poll() is None:
            peak = max(peak, _rss_mib(proc.pid))
            if mem_available_mib() < MEMORY_FLOOR_MIB or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                why = "timed out" if time.monotonic() > deadline else "does not fit in this machine's memory"
                return {"skipped": f"{why} (stopped at {peak / 1024:.1f} GiB RSS)"}
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read().strip()
    if proc.returncode != 0:
        return {"error": stderr.splitlines()[-1] if stderr else f"rc {proc.returncode}"}
    return json.loads(stdout.strip().splitlines()[-1])


def du_mib(path: Path) -> float:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) / 2**20


def busy() -> str:
    """Other heavy work on the machine (pytest, torchrun) while we measure, if any."""
    mine = {os.getpid(), os.getppid()}
    others = []
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            pid = int(status.parent.name)
            cmd = status.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if pid not in mine and ("pytest" in cmd or "torch.distributed.run" in cmd or "megamix train" in cmd):
            others.append(pid)
    return f"busy: {len(others)} other test/training processes" if others else "idle"


def fmt(result: dict | None, key: str, unit: str = "") -> str:
    if result is None:
        return "—"
    if "skipped" in result:
        return "skipped"
    if "error" in result:
        return "error"
    value = result.get(key)
    if value is None:
        return "—"
    return f"{value:,.1f}{unit}" if value < 100 else f"{value:,.0f}{unit}"


def run_scale(scale: float, workdir: Path, repeats: int, samples: int, systems: set[str]) -> dict:
    docs = int(round(FULL_C4_DOCS * scale))
    here = workdir / f"c4x{scale:g}"
    here.mkdir(parents=True, exist_ok=True)
    prefix = str(here / "corpus")
    t = time.perf_counter()
    corpus = write_corpus(prefix, docs)
    corpus["write_s"] = time.perf_counter() - t
    corpus["conditions"] = [busy()]
    print(f"[{scale:g}] corpus: {docs:,} documents, {corpus['tokens']:,} tokens, .idx "
          f"{os.path.getsize(prefix + '.idx') / 2**30:.2f} GiB, written in {corpus['write_s']:.0f} s", flush=True)
    results: dict[str, dict] = {}

    def run(name: str, system: str, cache: str) -> dict:
        r = measure(system, prefix, cache, samples)
        print(f"[{scale:g}] {name}: {r}", flush=True)
        corpus["conditions"].append(busy())
        return r

    ours, theirs = str(here / "cache-megamix"), str(here / "cache-megatron")
    if "v0.1" in systems:
        results["v0.1"] = run("v0.1", "v0.1", ours)
    if "megamix" in systems:
        results["megamix-first"] = run("megamix-first", "megamix", ours)
    if "megatron" in systems:
        results["megatron-first"] = run("megatron-first", "megatron", theirs)
    results["cache_mib"] = {"megamix": du_mib(Path(ours)), "megatron": du_mib(Path(theirs))}
    interleaved = [(s, c) for s, c in (("megamix", ours), ("megatron", theirs), ("open", ours))
                   if s in systems or (s == "open" and "megamix" in systems)]
    starts: dict[str, list[dict]] = {s: [] for s, _ in interleaved}
    for _ in range(repeats):
        for system, cache in interleaved:
            starts[system].append(run(f"{system}-cached", system, cache))
    for system, runs in starts.items():
        ok = [r for r in runs if "seconds" in r]
        results[f"{system}-cached"] = {k: statistics.median(r[k] for r in ok) for k in ok[0]} if ok else runs[0]
    if "loader" in systems:
        for workers in (0, 2):
            results[f"loader-{workers}"] = run(f"loader-{workers}", f"loader-{workers}", ours)
    results["scale"], results["samples"] = scale, samples
    results["corpus"] = corpus
    return results


def table(all_results: list[dict]) -> str:
    lines = []
    for r in all_results:
        c = r["corpus"]
        lines.append(f"\n### {r['scale']:g} × C4: {c['documents']:,} documents, {c['tokens']:,} tokens; "
                     f"{r['samples']:,} samples of {SEQ} tokens\n")
        lines.append("| | v0.1 (rebuilt per start) | megamix: first start (builds cache) | megamix: cached start "
                     "| Megatron-Core: first build | Megatron-Core: cached start | target |")
        lines.append("|---|---|---|---|---|---|---|")
        cols = ["v0.1", "megamix-first", "megamix-cached", "megatron-first", "megatron-cached"]
        lines.append("| start time (s) | " + " | ".join(fmt(r.get(k), "seconds") for k in cols)
                     + " | cached < 2 s; build ≤ Megatron-Core |")
        lines.append("| USS after start (MiB) | " + " | ".join(fmt(r.get(k), "uss_mib") for k in cols)
                     + " | cached < 100 MB |")
        lines.append("| of which anonymous (MiB) | " + " | ".join(fmt(r.get(k), "anon_mib") for k in cols) + " | |")
        lines.append("| peak RSS during start (MiB) | " + " | ".join(fmt(r.get(k), "peak_rss_mib") for k in cols)
                     + " | |")
        lines.append(f"| cache on disk (MiB) | — | {r['cache_mib']['megamix']:,.0f} | (same) | "
                     f"{r['cache_mib']['megatron']:,.0f} | (same) | |")
        o = r.get("open-cached", {})
        lines.append(f"\nOpening the `.idx` with IndexedDataset's full offset check (a first start; a cached start "
                     f"skips it for an unchanged file): "
                     f"{fmt(o, 'seconds')} s, USS {fmt(o, 'uss_mib')} MiB, peak RSS {fmt(o, 'peak_rss_mib')} MiB "
                     f"(median of the interleaved repeats).")
        lines.append(f"Step loader, seq {SEQ}, micro-batch 8: {fmt(r.get('loader-0'), 'samples_per_s')} samples/s "
                     f"with 0 workers, {fmt(r.get('loader-2'), 'samples_per_s')} with 2 workers.")
        skipped = [f"{k}: {v['skipped']}" for k, v in r.items() if isinstance(v, dict) and "skipped" in v]
        errors = [f"{k}: {v['error']}" for k, v in r.items() if isinstance(v, dict) and "error" in v]
        if skipped:
            lines.append("Skipped: " + "; ".join(skipped) + ".")
        if errors:
            lines.append("Errors: " + "; ".join(errors) + ".")
        lines.append(f"Machine while measuring: {', '.join(sorted(set(c['conditions'])))}; "
                     f"corpus written in {c['write_s']:.0f} s.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="0.1,1", help="comma-separated fractions of full C4 (365M documents)")
    parser.add_argument("--workdir", default=None, help="where to write corpora and caches (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the cached starts")
    parser.add_argument("--systems", default="v0.1,megamix,megatron,loader", help="which to measure")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=SAMPLES, help="training samples asked for (76.8M)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.prefix, args.cache, args.samples)))
        return 0
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="megamix-data-scale-"))
    results = []
    try:
        for scale in sorted(float(s) for s in args.scales.split(",")):
            results.append(run_scale(scale, workdir, args.repeats, args.samples, set(args.systems.split(","))))
            if not args.keep:
                shutil.rmtree(workdir / f"c4x{scale:g}", ignore_errors=True)
            print(table(results[-1:]), flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n## Data index at C4 scale\n" + table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
