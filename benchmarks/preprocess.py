#!/usr/bin/env python3
"""How close tools/preprocess_c4.py gets to the tokenizer's own speed.

    python benchmarks/preprocess.py                      # 16,000 demo documents in C4 format
    python benchmarks/preprocess.py --input 'c4/en/c4-train.0000[0-3]-of-01024.json.gz'

Measures, on the same documents: the tokenizer's raw batch encode in this process (texts already
in memory; 1 thread, then every core: the ceiling), and the tool end to end (process start to
files on disk) at each ``--workers``.  The tool's outputs at every worker count must be identical.
Megatron's published rates, for scale: 6-10K docs/s per 16-worker node (375-625 per worker),
BigScience's variant 22K docs/s with 48 workers (~460 per worker).
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from make_demo_corpus import documents, mistral_tokenizer_path, write_shard  # noqa: E402
from preprocess_c4 import usable_cores  # noqa: E402

from megamix.data.tokenizer import load_tokenizer  # noqa: E402

MEGATRON_PER_WORKER = (375, 625)  # docs/s: 6-10K docs/s on 16 workers


def demo_input(directory: Path, num_docs: int, shards: int) -> list[str]:
    """``num_docs`` C4-format documents (the demo text, repeated) in ``shards`` json.gz files."""
    base = documents(400)
    docs = [base[i % len(base)] for i in range(num_docs)]
    paths = []
    for k in range(shards):
        path = directory / f"c4-train.{k:05d}-of-{shards:05d}.json.gz"
        write_shard(path, docs[k * num_docs // shards : (k + 1) * num_docs // shards])
        paths.append(str(path))
    return paths


def read_texts(paths: list[str], key: str) -> list[str]:
    texts = []
    for path in paths:
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
            texts.extend(json.loads(line)[key] for line in f if line.strip())
    return texts


def raw_encode(tokenizer_path: str, texts: list[str], threads: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the tokenizer's batch encode of ``texts``, 1,000 per call."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    tokenizer = load_tokenizer(tokenizer_path, threads=threads)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), 1000):
        tokenizer.encode_batch(texts[i : i + 1000])
    return time.perf_counter() - wall, time.process_time() - cpu


def run_tool(paths: list[str], prefix: Path, tokenizer: str, workers: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the tool, process start to files on disk, workers included."""
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_c4.py"), "--input", *paths,
           "--output-prefix", str(prefix), "--tokenizer", tokenizer, "--workers", str(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", metavar="GLOB", help="JSON-lines shards (default: demo text)")
    p.add_argument("--json-key", default="text")
    p.add_argument("--tokenizer", default=None, help="default: mistral-common's SentencePiece model")
    p.add_argument("--docs", type=int, default=16000, help="documents to generate without --input")
    p.add_argument("--shards", type=int, default=4, help="shards to generate without --input")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds; each row reports its fastest, the least disturbed on a shared machine")
    args = p.parse_args()
    cores = usable_cores()
    tokenizer = args.tokenizer or str(mistral_tokenizer_path())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.input:
            paths = [m for pattern in args.input for m in sorted(glob.glob(pattern))]
        else:
            paths = demo_input(tmp, args.docs, args.shards)
        texts = read_texts(paths, args.json_key)
        n = len(texts)
        tokens = sum(len(ids) + 1 for ids in load_tokenizer(tokenizer).encode_batch(texts))
        mb = sum(len(t.encode()) for t in texts) / 2**20
        print(f"{n:,} documents, {tokens:,} tokens, {mb:,.1f} MB of text, {len(paths)} files; {cores} cores; "
              f"fastest of {args.repeat} interleaved rounds\ntokenizer: {tokenizer}\n")

        thread_counts = sorted({1, cores})
        names = [f"raw batch encode, 1 process, {t} thread{'s' * (t > 1)}" for t in thread_counts]
        names += [f"preprocess_c4.py --workers {w}, end to end" for w in args.workers]
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeat):  # rounds, so that a busy spell slows every row alike
            runs = [raw_encode(tokenizer, texts, t) for t in thread_counts]
            runs += [run_tool(paths, tmp / f"out-w{w}", tokenizer, w) for w in args.workers]
            for name, run in zip(names, runs):
                best[name] = min(best.get(name, run), run)
        same = all(filecmp.cmp(f"{tmp / f'out-w{args.workers[0]}'}{ext}", f"{tmp / f'out-w{w}'}{ext}", shallow=False)
                   for w in args.workers[1:] for ext in (".bin", ".idx"))

    raw1_wall, raw1_cpu = best[names[0]]
    ceiling = best[names[len(thread_counts) - 1]][0]
    width = max(map(len, names))
    print(f"{'':<{width}}  {'seconds':>7}  {'docs/s':>7}  {'tokens/s':>9}  {'× raw 1 thread':>14}  "
          f"{'÷ ceiling':>9}  {'CPU s':>6}  {'CPU ÷ raw':>9}")
    for name in names:
        wall, cpu = best[name]
        print(f"{name:<{width}}  {wall:7.2f}  {n / wall:7,.0f}  {tokens / wall:9,.0f}  {raw1_wall / wall:14.2f}  "
              f"{ceiling / wall:9.2f}  {cpu:6.2f}  {cpu / raw1_cpu:9.2f}")
    low, high = MEGATRON_PER_WORKER
    print(f"\nceiling: the raw encode on all {cores} cores.  CPU ÷ raw: the pipeline's total CPU time "
          "over the bare tokenizer's (1.00 = free).\n"
          f"outputs identical across --workers {' '.join(map(str, args.workers))}: {'yes' if same else 'NO'}")
    for w in args.workers:
        wall = best[f"preprocess_c4.py --workers {w}, end to end"][0]
        per_core = n / wall / min(w, cores)
        print(f"--workers {w}: {raw1_wall / wall:.2f} × raw 1-thread docs/s; {per_core:,.0f} docs/s per core "
              f"= {per_core / high:.1f}-{per_core / low:.1f} × Megatron's {low}-{high} per worker")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
