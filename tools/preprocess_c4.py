#!/usr/bin/env python3
"""Tokenize C4 (or any JSON-lines / plain-text corpus) into one Megatron ``PREFIX.bin`` + ``.idx``.

    python tools/preprocess_c4.py --input 'c4/en/c4-train.*.json.gz' \\
        --output-prefix data/c4-train --tokenizer tokenizer.model --workers 16

Inputs, in the order given (each glob sorted): ``*.json.gz`` / ``*.jsonl[.gz]`` / ``*.json``
(one JSON object per line, text under ``--json-key``) and ``*.txt[.gz]`` (documents are blocks
separated by blank lines).  Every document becomes one sequence: its ids, plus the EOS id unless
``--no-append-eod``.  Documents that tokenize to nothing are skipped and counted.

Speed: torch is never imported.  The main process only decompresses, cuts the stream into 256 KiB
blocks of whole lines and writes; worker processes decode JSON and tokenize a whole block per call
(the tokenizer's batch encode).  At most ``2 * workers + 2`` blocks are in flight, so memory stays
bounded however slow the disk, and results are written in input order: the output is byte-identical
for any ``--workers``.

Resuming: each input file is first written to ``PREFIX.shards/NAME.{bin,idx}`` under temporary
names, renamed when complete, then described by ``NAME.json`` (the input's size and mtime, the
tokenizer's hash, the options, the counts).  Re-running the same command skips every input whose
manifest still matches, tokenizes the rest, and merges the shards, in input order, into
``PREFIX.bin`` / ``PREFIX.idx`` (also written under temporary names and renamed).  The shard
directory is removed afterwards unless ``--keep-shards``.  Each manifest also keeps its shard's
largest token id, so the final ``PREFIX.json`` (:mod:`megamix.data.sidecar`: tokenizer fingerprint,
vocabulary size, counts, ``max_id``) never re-reads a finished shard.

Many machines (``slurm/preprocess.sh`` submits this as a Slurm job array): ``--shard-slice I/N``
tokenizes only inputs ``I, I+N, I+2N, ...`` (0-based, in the input order above) into the shard
directory and stops; once every slice has finished, ``--merge-only`` merges all the shards (and
fails, naming them, if any is missing or stale).  The result is byte-identical to one process.

Errors (bad input, a missing file, an unreadable tokenizer, no documents at all) are one line,
``preprocess_c4: ...``, with exit code 1 (2 for bad arguments); ``--debug`` shows the traceback.
Workers die with the main process (``PR_SET_PDEATHSIG`` on Linux), so a killed run leaves none.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "megamix").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from megamix.data.indexed import (  # noqa: E402
    CODE_OF_DTYPE,
    MAGIC,
    VERSION,
    IndexedDataset,
    IndexedDatasetWriter,
    token_dtype,
)
from megamix.data.sidecar import sidecar_path, write_sidecar  # noqa: E402
from megamix.data.tokenizer import fingerprint, load_tokenizer  # noqa: E402
from megamix.errors import MegamixError  # noqa: E402

BLOCK_BYTES = 1 << 18  # uncompressed bytes handed to a worker per call (~100 C4 documents)
HUGE_DOC_BYTES = 1 << 20  # documents above this are counted (they are still tokenized whole)
MANIFEST_FORMAT = 2  # 2: manifests keep the shard's max_id (format-1 shards are tokenized again)
MAX_EXAMPLES = 10  # malformed-line locations kept per shard for the summary
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class PreprocessError(MegamixError):
    """Bad input or arguments: :func:`main` prints the message as one line and exits with 1."""


class MalformedInput(PreprocessError):
    """A malformed line in strict mode; the message is ``FILE:LINE: reason``."""


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "json" or "text"
    compressed: bool
    size: int
    mtime_ns: int

    @property
    def work_name(self) -> str:
        """Shard name in the work dir: readable, and unique per absolute input path."""
        digest = hashlib.sha1(os.path.abspath(self.path).encode()).hexdigest()[:10]
        return f"{Path(self.path).name}-{digest}"


def find_inputs(patterns: list[str]) -> list[InputFile]:
    """Expand the globs in order (each one sorted), dropping repeats."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if os.path.isfile(pattern) else [])
        files = [m for m in matches if os.path.isfile(m)]
        if not files:
            raise PreprocessError(f"--input {pattern!r} matches no file" + (" (only directories)" if matches else ""))
        paths.extend(files)
    inputs = []
    for path in dict.fromkeys(paths):
        name = path.removesuffix(".gz")
        if name.endswith(".txt"):
            kind = "text"
        elif name.endswith((".jsonl", ".json")):
            kind = "json"
        else:
            raise PreprocessError(f"{path}: unknown input type (expected .json[l][.gz] or .txt[.gz])")
        st = os.stat(path)
        inputs.append(InputFile(path, kind, path.endswith(".gz"), st.st_size, st.st_mtime_ns))
    return inputs


def iter_records(kind: str, data: bytes, first_line: int) -> Iterator[tuple[int, bytes, int]]:
    """``(line number, raw document, end offset in data)`` for each document in a block of lines.

    JSON: every non-blank line.  Text: every run of non-blank lines, joined with ``\\n``.
    """
    pos = 0
    block: list[bytes] = []
    start = block_end = 0
    for i, line in enumerate(data.split(b"\n")):
        pos += len(line) + 1
        blank = not line or line.isspace()
        if kind == "json":
            if not blank:
                yield first_line + i, line, pos
        elif not blank:
            if not block:
                start = first_line + i
            block.append(line.rstrip(b"\r"))
            block_end = pos
        elif block:
            yield start, b"\n".join(block), block_end
            block = []
    if block:
        yield start, b"\n".join(block), block_end


def _cut(kind: str, buf: bytes) -> int:
    """How much of ``buf`` ends on a document boundary (0: read more)."""
    end = buf.rfind(b"\n")
    if kind == "json" or end < 0:
        return end + 1
    while end >= 0:  # text: cut after the last blank line
        prev = buf.rfind(b"\n", 0, end)
        if buf[prev + 1 : end].isspace() or prev + 1 == end:
            return end + 1
        end = prev
    return 0


@dataclass
class Block:
    """One unit of work, plus what the writer needs to know about it."""

    inp: InputFile
    first_line: int
    data: bytes
    input_bytes: int  # compressed input consumed since the previous block (for the progress bar)
    last: bool = False  # the input's final block: the writer finishes the shard after it
    limit: int | None = None  # --max-docs records left when this input was started
    complete: bool = True  # the input was read to its end (not cut by --max-docs)
    left_after: int | None = None  # --max-docs records left after this input (on the last block)


def read_blocks(inp: InputFile, limit: int | None) -> Iterator[Block]:
    """Stream ``inp`` as blocks of whole documents; at most ``limit`` documents when given.

    The final block has ``last=True`` (it may be empty, so that empty inputs still get a shard).
    """
    line, pos, buf, left = 1, 0, bytearray(), limit
    pending: Block | None = None
    with open(inp.path, "rb") as raw, (gzip.GzipFile(fileobj=raw) if inp.compressed else raw) as stream:
        while True:
            try:
                chunk = stream.read(BLOCK_BYTES)
            except (OSError, EOFError) as e:
                raise PreprocessError(f"{inp.path}: cannot read ({e}); the file is corrupt or truncated") from e
            buf += chunk
            cut = len(buf) if not chunk else _cut(inp.kind, buf)
            if cut == 0 and chunk:
                continue
            data = bytes(buf[:cut])
            del buf[:cut]
            cut_short = False
            if left is not None:
                ends = [end for _, _, end in iter_records(inp.kind, data, line)]
                if len(ends) >= left:
                    data, cut_short = data[: ends[left - 1]] if left else b"", True
                left -= min(left, len(ends))
            if pending is not None:
                yield pending
            pending = Block(inp, line, data, raw.tell() - pos, limit=limit)
            pos, line = raw.tell(), line + data.count(b"\n")
            if cut_short or not chunk:
                pending.last, pending.complete, pending.left_after = True, not cut_short, left
                yield pending
                return


# ---------------------------------------------------------------------------------------------
# Tokenizing (in worker processes, or inline with --workers 1)


@dataclass
class Stats:
    records: int = 0  # documents read, including malformed and empty ones
    documents: int = 0  # documents written
    tokens: int = 0
    malformed: int = 0
    empty: int = 0  # tokenized to nothing: skipped
    non_utf8: int = 0  # invalid UTF-8 or lone surrogates, replaced by U+FFFD
    huge: int = 0
    text_bytes: int = 0

    def add(self, other: Stats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class BlockResult:
    tokens: bytes = b""  # the documents' ids, concatenated, in the output dtype
    lengths: bytes = b""  # int32 per document
    stats: Stats = field(default_factory=Stats)
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line, reason), first few
    error: tuple[int, str] | None = None  # strict mode: the first malformed line
    max_id: int = -1  # the largest id in ``tokens`` (-1: no tokens), for the corpus's PREFIX.json


@dataclass(frozen=True)
class Settings:
    tokenizer: str
    json_key: str
    append_eod: bool
    skip_malformed: bool
    dtype: str


class BlockEncoder:
    """Turns a block of raw lines into token bytes + lengths, counting what it had to skip or fix."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.tokenizer = load_tokenizer(settings.tokenizer, threads=1)
        self.eos = self.tokenizer.eos_id
        self.dtype = np.dtype(settings.dtype)

    def __call__(self, kind: str, first_line: int, data: bytes) -> BlockResult:
        result = BlockResult()
        stats = result.stats
        stats.text_bytes = len(data)
        texts = []
        for line, raw, _ in iter_records(kind, data, first_line):
            stats.records += 1
            try:
                text = raw.decode("utf-8")
                repaired = False
            except UnicodeDecodeError:
                text, repaired = raw.decode("utf-8", "replace"), True
            if kind == "json":
                text, reason = self._json_text(text)
                if reason:
                    if not self.settings.skip_malformed:
                        result.error = (line, reason)
                        return result
                    stats.malformed += 1
                    if len(result.malformed) < MAX_EXAMPLES:
                        result.malformed.append((line, reason))
                    continue
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates, from JSON escapes like "\\ud800"
                    text, repaired = LONE_SURROGATE.sub("\ufffd", text), True
            stats.non_utf8 += repaired
            stats.huge += len(raw) > HUGE_DOC_BYTES
            texts.append(text)

        docs = [ids for ids in self.tokenizer.encode_batch(texts) if ids]
        stats.empty = len(texts) - len(docs)
        if self.settings.append_eod:
            for ids in docs:
                ids.append(self.eos)
        lengths = np.fromiter(map(len, docs), np.int32, len(docs))
        total = int(lengths.sum(dtype=np.int64))
        ids = np.fromiter(itertools.chain.from_iterable(docs), self.dtype, total)
        result.tokens = ids.tobytes()
        result.max_id = int(ids.max()) if total else -1
        result.lengths = lengths.tobytes()
        stats.documents, stats.tokens = len(docs), total
        return result

    def _json_text(self, line: str) -> tuple[str, str | None]:
        key = self.settings.json_key
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return "", f"invalid JSON: {e.msg} (column {e.colno})"
        if not isinstance(obj, dict):
            return "", f"not a JSON object but {type(obj).__name__}"
        if key not in obj:
            return "", f"no {key!r} field"
        if not isinstance(obj[key], str):
            return "", f"{key!r} is {type(obj[key]).__name__}, not a string"
        return obj[key], None


_worker_encoder: BlockEncoder | None = None


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """End this worker when the tool's main process ends, however it ends.

    A pool worker otherwise waits on its task queue forever once the main process is gone
    (``kill -9``, the OOM killer, a node's job cleanup that only signals the main process): idle
    processes holding a tokenizer each.  Linux kills us itself (``PR_SET_PDEATHSIG``; the parent
    "thread" is the main thread, which is the one that starts the workers); elsewhere a thread
    watches the parent pid.  A parent that died before the setting took effect is caught by the
    ``getppid`` check (an orphan is adopted by another process).
    """
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_worker(settings: Settings, parent_pid: int) -> None:
    global _worker_encoder
    _die_with_parent(parent_pid)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    _worker_encoder = BlockEncoder(settings)


def _encode_in_worker(kind: str, first_line: int, data: bytes) -> BlockResult:
    return _worker_encoder(kind, first_line, data)


def encode_in_order(blocks: Iterator[Block], settings: Settings, workers: int) -> Iterator[tuple[Block, BlockResult]]:
    """``(block, result)`` in input order, with at most ``2 * workers + 2`` blocks in flight."""
    if workers == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        encoder = BlockEncoder(settings)
        for block in blocks:
            yield block, encoder(block.inp.kind, block.first_line, block.data)
        return
    import multiprocessing

    # Workers are started by submit(), from this (the main) thread: PR_SET_PDEATHSIG follows the
    # thread that created the process, so they die with the main thread, i.e. with the tool.
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker, (settings, os.getpid()))
    pending: deque = deque()
    try:
        for block in blocks:
            if len(pending) >= 2 * workers + 2:
                ready, future = pending.popleft()
                yield ready, future.result()
            pending.append((block, pool.submit(_encode_in_worker, block.inp.kind, block.first_line, block.data)))
            block.data = b""  # the pool holds its own copy until a worker takes it
        while pending:
            ready, future = pending.popleft()
            yield ready, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Shards: per-input outputs and their manifests


@dataclass
class Shard:
    """One input's own output, ``PREFIX.shards/NAME.{bin,idx}``, and its manifest ``NAME.json``."""

    inp: InputFile
    prefix: Path
    key: dict  # everything the shard's bytes depend on: a manifest with another key is stale

    @classmethod
    def of(cls, inp: InputFile, workdir: Path, settings: Settings, tokenizer_hash: str) -> Shard:
        key = {
            "format": MANIFEST_FORMAT,
            "input": os.path.abspath(inp.path),
            "size": inp.size,
            "mtime_ns": inp.mtime_ns,
            "kind": inp.kind,
            "json_key": settings.json_key if inp.kind == "json" else None,
            "append_eod": settings.append_eod,
            "dtype": settings.dtype,
            "tokenizer": tokenizer_hash,
        }
        return cls(inp, workdir / inp.work_name, key)

    @property
    def manifest_path(self) -> Path:
        return self.prefix.with_name(self.prefix.name + ".json")

    def reusable(self, limit: int | None, strict: bool) -> dict | None:
        """The manifest, when this shard is finished and valid for the current run."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        stats = manifest.get("stats", {})
        if manifest.get("key") != self.key or (strict and stats.get("malformed")):
            return None
        records = stats.get("records", -1)
        if manifest.get("complete"):
            fits = limit is None or records <= limit
        else:  # cut short by --max-docs: valid only for the same cut
            fits = limit is not None and records == limit
        if not fits:
            return None
        try:
            if len(IndexedDataset(self.prefix)) != stats.get("documents"):
                return None
        except ValueError:
            return None
        return manifest

    def write_manifest(self, stats: Stats, malformed: list, limit: int | None, complete: bool, max_id: int) -> None:
        manifest = {"key": self.key, "limit": limit, "complete": complete, "stats": asdict(stats),
                    "max_id": max_id, "malformed_examples": malformed}
        tmp = self.manifest_path.with_name(self.manifest_path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest_path)


def merge(prefixes: list[Path], output_prefix: str, dtype: np.dtype) -> None:
    """Concatenate shards into ``output_prefix.bin/.idx``, streaming (memory: one shard's index)."""
    out_bin, out_idx = Path(output_prefix + ".bin"), Path(output_prefix + ".idx")
    tmp_bin, tmp_idx = out_bin.with_name(out_bin.name + ".tmp"), out_idx.with_name(out_idx.name + ".tmp")

    def lengths(prefix: Path) -> np.ndarray:
        return np.array(IndexedDataset(prefix).sequence_lengths)

    with open(tmp_bin, "wb", buffering=0) as out:
        for prefix in prefixes:
            with open(prefix.with_name(prefix.name + ".bin"), "rb", buffering=0) as src:
                _append(src, out)
        os.fsync(out.fileno())
    counts = [len(IndexedDataset(p)) for p in prefixes]
    num_seqs = sum(counts)
    with open(tmp_idx, "wb") as f:
        f.write(MAGIC)
        f.write(np.array([VERSION], "<u8").tobytes())
        f.write(bytes([CODE_OF_DTYPE[dtype]]))
        f.write(np.array([num_seqs, num_seqs + 1], "<u8").tobytes())
        for prefix in prefixes:
            f.write(lengths(prefix).astype("<i4").tobytes())
        offset = 0
        for prefix in prefixes:
            nbytes = lengths(prefix).astype(np.int64) * dtype.itemsize
            pointers = np.cumsum(nbytes) - nbytes + offset
            f.write(pointers.astype("<i8").tobytes())
            offset += int(nbytes.sum())
        step = 1 << 22
        f.writelines(np.arange(i, min(i + step, num_seqs + 1), dtype="<i8").tobytes()
                     for i in range(0, num_seqs + 1, step))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_bin, out_bin)
    os.replace(tmp_idx, out_idx)


def _append(src, dst) -> None:
    """Copy the rest of ``src`` to ``dst`` (unbuffered files): in the kernel where the OS allows
    (a reflink on XFS/btrfs, so no second copy of the corpus on disk), else through memory."""
    try:
        while os.copy_file_range(src.fileno(), dst.fileno(), 1 << 30):
            pass
        return
    except (AttributeError, OSError):  # no copy_file_range here; both files stay where it stopped
        pass
    while chunk := src.read(16 << 20):
        view = memoryview(chunk)
        while view:
            view = view[dst.write(view):]


# ---------------------------------------------------------------------------------------------
# The run


class Progress:
    """tqdm over input bytes, with documents/s and tokens/s alongside."""

    def __init__(self, total: int | None):
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="input",
                        file=sys.stderr, mininterval=0.5 if tty else 30, dynamic_ncols=tty)
        self.start, self.last, self.docs, self.tokens = time.monotonic(), 0.0, 0, 0

    def update(self, input_bytes: int, stats: Stats) -> None:
        self.docs += stats.documents
        self.tokens += stats.tokens
        now = time.monotonic()
        if now - self.last > 0.5:
            self.last = now
            dt = max(now - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt / 1e6:,.2f}M tok/s",
                                     refresh=False)
        self.bar.update(input_bytes)

    def close(self) -> None:
        self.bar.close()


@dataclass
class Plan:
    """What a run works on: every input's shard, in input order, and what their bytes depend on."""

    shards: list[Shard]
    tokenizer: object  # megamix.data.tokenizer.Tokenizer
    tokenizer_hash: str
    settings: Settings
    dtype: np.dtype
    workdir: Path


def check_output_prefix(prefix: str, inputs: list[InputFile]) -> None:
    """Refuse, before any input is read, an ``--output-prefix`` that cannot be written."""
    if prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        raise PreprocessError(f"--output-prefix {prefix!r} is a directory; give a file prefix inside it, "
                              f"e.g. {os.path.join(prefix, 'c4_train')!r}")
    ancestor = Path(prefix).parent
    while not ancestor.exists():  # missing directories are created; the nearest existing one must be one
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PreprocessError(f"--output-prefix {prefix!r}: {ancestor} is not a directory")
    outputs = {os.path.abspath(prefix + suffix) for suffix in (".bin", ".idx", ".json")}
    for inp in inputs:
        if os.path.abspath(inp.path) in outputs:
            raise PreprocessError(f"--output-prefix {prefix!r} would overwrite the input {inp.path}")


def open_tokenizer(path: str):
    """The tokenizer, or a :class:`PreprocessError` naming the path (the ``tokenizers`` library
    raises a bare ``Exception`` for a corrupt ``tokenizer.json``)."""
    try:
        return load_tokenizer(path, threads=1)
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        if not reason.startswith(str(path)):
            reason = f"{path}: cannot load the tokenizer ({reason})"
        raise PreprocessError(reason) from e


def make_plan(args: argparse.Namespace) -> Plan:
    """Inputs, output prefix and tokenizer checked, shards named: nothing is written yet."""
    inputs = find_inputs(args.input)
    check_output_prefix(args.output_prefix, inputs)
    tokenizer = open_tokenizer(args.tokenizer)
    if args.append_eod and tokenizer.eos_id is None:
        raise PreprocessError(f"{args.tokenizer} has no EOS token; pass --no-append-eod")
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    settings = Settings(str(args.tokenizer), args.json_key, args.append_eod, args.skip_malformed, dtype.str)
    tokenizer_hash = fingerprint(tokenizer)
    workdir = Path(args.output_prefix + ".shards")
    shards = [Shard.of(inp, workdir, settings, tokenizer_hash) for inp in inputs]
    return Plan(shards, tokenizer, tokenizer_hash, settings, dtype, workdir)


def tokenize(plan: Plan, shards: list[Shard], args: argparse.Namespace) -> tuple[list[Shard], int]:
    """Finish every shard of ``shards`` not finished by an earlier run, in order.

    Returns the shards this run covers (all of ``shards``, or those within ``--max-docs``) and how
    many of them were reused as they were.
    """
    strict = not args.skip_malformed
    by_path = {shard.inp.path: shard for shard in shards}
    used: list[Shard] = []  # in input order: what gets merged
    reused = 0

    def blocks() -> Iterator[Block]:
        """Blocks of every input that still needs work; notes every input covered in ``used``."""
        nonlocal reused
        left = args.max_docs
        for shard in shards:
            if left == 0:
                return
            manifest = shard.reusable(left, strict)
            if manifest is not None:
                used.append(shard)
                reused += 1
                if left is not None:
                    left -= manifest["stats"]["records"]
                continue
            used.append(shard)
            for block in read_blocks(shard.inp, left):
                yield block
            left = block.left_after

    plan.workdir.mkdir(parents=True, exist_ok=True)
    todo = sum(s.inp.size for s in shards if s.reusable(None, strict) is None)
    progress = Progress(None if args.max_docs is not None else todo)
    writer, stats, malformed, max_id = None, Stats(), [], -1
    try:
        for block, result in encode_in_order(blocks(), plan.settings, args.workers):
            if result.error:
                line, reason = result.error
                raise MalformedInput(f"{block.inp.path}:{line}: {reason}")
            if writer is None:
                shard = by_path[block.inp.path]
                writer, stats, malformed, max_id = IndexedDatasetWriter(shard.prefix, plan.dtype), Stats(), [], -1
            writer.write_raw(result.tokens)
            writer.add_lengths(np.frombuffer(result.lengths, np.int32))
            stats.add(result.stats)
            max_id = max(max_id, result.max_id)
            malformed += result.malformed[: MAX_EXAMPLES - len(malformed)]
            progress.update(block.input_bytes, result.stats)
            if block.last:
                writer.finalize()
                writer = None
                shard.write_manifest(stats, malformed, block.limit, block.complete, max_id)
    finally:
        if writer is not None:
            writer.abort()
        progress.close()
    return used, reused


def finished_shards(plan: Plan, args: argparse.Namespace) -> list[Shard]:
    """``--merge-only``: every input's shard, each finished and valid for these options, or an error
    naming the ones that are not (a slice task that failed or never ran, an input changed since)."""
    strict = not args.skip_malformed
    bad = [f"{shard.inp.path} ({'missing' if not shard.manifest_path.exists() else 'stale or unfinished'})"
           for shard in plan.shards if shard.reusable(None, strict) is None]
    if bad:
        listed = ", ".join(bad[:5]) + (f", and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise PreprocessError(
            f"--merge-only: {len(bad)} of {len(plan.shards)} inputs have no finished shard in {plan.workdir}/: "
            f"{listed}; run their --shard-slice tasks again (or the tool without --merge-only)")
    return plan.shards


def collect(shards: list[Shard]) -> tuple[Stats, list, int]:
    """Totals, malformed-line examples and the largest token id, from the shards' manifests."""
    total, examples, max_id = Stats(), [], -1
    for shard in shards:
        manifest = json.loads(shard.manifest_path.read_text())
        total.add(Stats(**manifest["stats"]))
        max_id = max(max_id, manifest["max_id"])
        examples += [(shard.inp.path, line, reason) for line, reason in manifest["malformed_examples"]]
    return total, examples, max_id


def name_inputs(shards: list[Shard], patterns: list[str]) -> str:
    paths = [s.inp.path for s in shards] or patterns
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def write_corpus(plan: Plan, shards: list[Shard], total: Stats, max_id: int, args: argparse.Namespace) -> None:
    """Merge the shards into ``PREFIX.bin/.idx`` and describe them in ``PREFIX.json``.

    A corpus without a document is refused here: an empty ``.bin/.idx`` only fails later, in
    training, with an error that no longer names the inputs.
    """
    if total.documents == 0:
        if not args.keep_shards:
            shutil.rmtree(plan.workdir, ignore_errors=True)
        why = (f"all {total.records:,} read were skipped ({total.malformed:,} malformed, {total.empty:,} empty)"
               if total.records else "the inputs are empty")
        raise PreprocessError(f"no documents in {name_inputs(shards, args.input)}: {why}; "
                              f"{args.output_prefix}.bin/.idx not written")
    # The old description must never sit beside a new corpus, even if we die between the renames.
    sidecar_path(args.output_prefix).unlink(missing_ok=True)
    merge([shard.prefix for shard in shards], args.output_prefix, plan.dtype)
    tok = plan.tokenizer
    write_sidecar(args.output_prefix, tokenizer_name=os.path.abspath(tok.name),
                  tokenizer_fingerprint=plan.tokenizer_hash, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                  documents=total.documents, tokens=total.tokens, max_id=max_id)
    if not args.keep_shards:
        shutil.rmtree(plan.workdir)


def run(args: argparse.Namespace) -> dict:
    start = time.monotonic()
    plan = make_plan(args)
    mine = plan.shards
    if args.shard_slice is not None:
        index, count = args.shard_slice
        mine = plan.shards[index::count]
    summary = {"mode": "dry-run" if args.dry_run else "slice" if args.shard_slice else "corpus", "plan": plan,
               "selected": mine}
    if args.dry_run:
        return summary
    if args.merge_only:
        used, reused = finished_shards(plan, args), len(plan.shards)
    else:
        used, reused = tokenize(plan, mine, args)
    total, examples, max_id = collect(used)
    if args.shard_slice is None:
        write_corpus(plan, used, total, max_id, args)
    summary.update(stats=total, examples=examples, inputs=len(used), reused=reused, max_id=max_id,
                   input_bytes=sum(s.inp.size for s in used), seconds=time.monotonic() - start)
    return summary


def print_summary(args: argparse.Namespace, summary: dict) -> None:
    plan: Plan = summary["plan"]
    if summary["mode"] == "dry-run":
        shards = plan.shards
        size = sum(s.inp.size for s in shards) / 2**20
        print(f"inputs     {len(shards)} ({size:,.1f} MiB), first {shards[0].inp.path}")
        print(f"tokenizer  {plan.tokenizer.name} (vocabulary {plan.tokenizer.vocab_size}, ids as {plan.dtype.name})")
        if args.shard_slice is not None:
            count = args.shard_slice[1]
            sizes = [len(shards[i::count]) for i in range(count)]
            print(f"slices     {count}: {min(sizes)} to {max(sizes)} inputs each"
                  + (f" ({sizes.count(0)} with nothing to do)" if 0 in sizes else ""))
        print(f"output     {args.output_prefix}.bin / .idx / .json (nothing written: --dry-run)")
        return
    s: Stats = summary["stats"]
    secs = summary["seconds"]
    if summary["mode"] == "slice":
        index, count = args.shard_slice
        output = f"{plan.workdir}/ (slice {index}/{count}; merge every slice with --merge-only)"
        inputs = f"{summary['inputs']} of {len(plan.shards)} ({summary['reused']} reused from an earlier run)"
    else:
        output = f"{args.output_prefix}.bin / .idx / .json ({plan.dtype.name})"
        inputs = f"{summary['inputs']} ({summary['reused']} reused from an earlier run)"
    rows = [
        ("output", output),
        ("inputs", inputs),
        ("documents", f"{s.documents:,} written of {s.records:,} read"),
        ("tokens", f"{s.tokens:,} (largest id {summary['max_id']}, vocabulary {plan.tokenizer.vocab_size})"),
        ("bytes", f"{summary['input_bytes'] / 2**20:,.1f} MiB input, {s.text_bytes / 2**20:,.1f} MiB text"),
        ("malformed lines", f"{s.malformed:,}" + (" (skipped)" if s.malformed else "")),
        ("empty documents", f"{s.empty:,} (skipped)"),
        ("non-UTF-8 documents", f"{s.non_utf8:,} (bad bytes replaced by U+FFFD)"),
        ("huge documents", f"{s.huge:,} (over {HUGE_DOC_BYTES >> 20} MiB, kept)"),
        ("wall time", (f"{secs:,.1f} s (merging finished shards only)" if args.merge_only else
                       f"{secs:,.1f} s: {s.documents / secs:,.0f} docs/s, {s.tokens / secs:,.0f} tokens/s, "
                       f"{s.text_bytes / secs / 2**20:,.1f} MB/s")),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for path, line, reason in summary["examples"][:MAX_EXAMPLES]:
        print(f"  skipped {path}:{line}: {reason}")


def shard_slice(text: str) -> tuple[int, int]:
    """``I/N`` → ``(I, N)`` with ``0 <= I < N`` (argparse type)."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N, e.g. 0/8")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                   help="input files or globs (quote them): *.json.gz, *.jsonl[.gz], *.txt[.gz]")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    p.add_argument("--tokenizer", required=True,
                   help="SentencePiece .model, Hugging Face tokenizer.json, or a directory with either")
    p.add_argument("--workers", type=int, default=usable_cores(),
                   help="tokenizing processes (default: the usable cores)")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the EOS id to every document (default: yes)")
    p.add_argument("--json-key", default="text", help="field holding the text (default: text)")
    p.add_argument("--skip-malformed", action="store_true",
                   help="count and skip malformed JSON lines instead of stopping at the first")
    p.add_argument("--max-docs", type=int, default=None, metavar="N",
                   help="read only the first N documents (in input order)")
    p.add_argument("--keep-shards", action="store_true", help="keep PREFIX.shards/ after merging")
    p.add_argument("--shard-slice", type=shard_slice, default=None, metavar="I/N",
                   help="tokenize only inputs I, I+N, I+2N, ... (0-based, input order) into PREFIX.shards/ and "
                        "stop, without merging: one task of a job array (slurm/preprocess.sh)")
    p.add_argument("--merge-only", action="store_true",
                   help="merge the finished shards of every input (after all --shard-slice tasks); "
                        "fails, naming them, if any is missing or stale")
    p.add_argument("--dry-run", action="store_true",
                   help="check the inputs, output prefix and tokenizer, print the plan, write nothing")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.max_docs is not None and args.max_docs < 0:
        p.error("--max-docs must be non-negative")
    if args.shard_slice is not None and args.merge_only:
        p.error("--shard-slice and --merge-only are the two halves of a split run; give one")
    if args.max_docs is not None and (args.shard_slice is not None or args.merge_only):
        p.error("--max-docs needs one process over all inputs; it cannot be split with --shard-slice/--merge-only")
    return args


def describe_error(e: BaseException, args: argparse.Namespace) -> str:
    """One line for the user: what went wrong, where, and what to do."""
    if isinstance(e, MalformedInput):
        message = (f"{e} (stopped; {args.output_prefix}.bin/.idx not written; finished inputs are kept for a "
                   "re-run; --skip-malformed skips such lines)")
    elif isinstance(e, PreprocessError):
        message = str(e)
    elif isinstance(e, BrokenProcessPool):
        message = ("a worker process died (out of memory?); finished inputs are kept: "
                   "re-run the same command to resume")
    elif isinstance(e, KeyboardInterrupt):
        message = f"interrupted; finished inputs are kept in {args.output_prefix}.shards/ for a re-run"
    elif isinstance(e, OSError) and e.filename is not None:
        target = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else e.filename
        message = f"{target}: {e.strerror or e}"
    else:
        message = f"{type(e).__name__}: {e} (--debug shows the traceback)"
    return re.sub(r"\s*\n\s*", " ", message.strip())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (Exception, KeyboardInterrupt) as e:
        if args.debug:
            raise
        print(f"preprocess_c4: {describe_error(e, args)}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    print_summary(args, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
