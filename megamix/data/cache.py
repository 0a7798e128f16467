"""Index arrays built once, published atomically, memory-mapped by every rank.

At C4 scale one epoch's document order and token starts are gigabytes.  Rebuilding them in every
rank's memory at every start costs a minute and a private copy per rank, so they are written once
into a cache directory and mapped (``np.load(mmap_mode="r")``) by every process that reads them:
the memory they use is the kernel's page cache, shared by all ranks of a node.

An entry is a directory ``CACHE_DIR/NAME-DIGEST/`` holding ``.npy`` arrays and ``manifest.json``.
``DIGEST`` hashes the entry's key (what the arrays are a function of, see the callers), so a
different corpus, document range or seed never finds a stale entry.  The manifest repeats the key
and records each array's dtype, shape, file size and a digest of its bytes (all of them for files
up to :data:`FULL_DIGEST_BYTES`, the head, tail and 256 sampled pages above that, so that mapping a
7 GB entry stays far under a second).  An entry whose manifest disagrees with its files (truncated,
overwritten, flipped bytes in the hashed pages) is moved aside and rebuilt with a one-line warning,
never trusted.

Publishing: the builder writes everything under a temporary directory next to the entry, then
renames it into place (``os.rename`` of a directory is atomic and fails if the target exists).
Two builders racing (several nodes sharing a file system) therefore produce one entry: the loser
sees the rename fail and discards its identical copy.  A best-effort ``fcntl`` lock lets a second
builder wait for the first instead of duplicating its work; file systems without locks still get
a correct result through the rename.

In a distributed run (:func:`torch.distributed` initialized, more than one rank) :func:`open_or_build`
lets one rank per node build (local rank 0: ``LOCAL_RANK`` or ``SLURM_LOCALID``), then holds every
rank at a barrier, then maps: a shared file system gets one entry (or a few identical racing ones),
node-local disks get one per node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "megamix-index-cache"
VERSION = 1
MANIFEST = "manifest.json"
FULL_DIGEST_BYTES = 64 << 20  # files up to this size are hashed whole
PAGE = 4096
EDGE = 1 << 20  # head and tail hashed whole in larger files
SAMPLED_PAGES = 256


class CacheError(RuntimeError):
    """An entry could not be built or mapped even after a rebuild."""


def file_digest(path: str | os.PathLike, size: int | None = None) -> str:
    """BLAKE2b of a file's size and bytes: all bytes up to :data:`FULL_DIGEST_BYTES`, above that
    the first and last MiB and 256 evenly spread pages (cheap on a 7 GB file, and still catches a
    file cut short or replaced by another)."""
    size = os.path.getsize(path) if size is None else size
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    with open(path, "rb") as f:
        if size <= FULL_DIGEST_BYTES:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        else:
            h.update(f.read(EDGE))
            span = size - 2 * EDGE - PAGE
            for k in range(SAMPLED_PAGES):
                f.seek(EDGE + span * k // (SAMPLED_PAGES - 1))
                h.update(f.read(PAGE))
            f.seek(size - EDGE)
            h.update(f.read(EDGE))
    return h.hexdigest()


def corpus_fingerprint(prefix: str | os.PathLike) -> dict:
    """A cheap identity of ``PREFIX.bin/.idx``: both sizes and a digest of the ``.idx`` (header,
    head, tail and sampled pages of its length and offset arrays).  Never reads the ``.bin``.
    Stable across processes and machines for the same bytes; a re-tokenized corpus changes it."""
    prefix = str(prefix)
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    idx_bytes = idx.stat().st_size
    return {"idx_bytes": idx_bytes, "bin_bytes": bin_.stat().st_size, "idx_digest": file_digest(idx, idx_bytes)}


def key_digest(key: dict) -> str:
    """The hex digest naming an entry: BLAKE2b of the key as canonical JSON."""
    text = json.dumps({"format": FORMAT, "version": VERSION, **key}, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def entry_path(cache_dir: str | os.PathLike, name: str, key: dict) -> Path:
    return Path(cache_dir) / f"{name}-{key_digest(key)}"


def save_array(directory: Path, name: str, array: np.ndarray) -> None:
    """Write ``array`` as ``directory/name.npy`` (inside a temporary entry being built)."""
    np.save(directory / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)


def new_array(directory: Path, name: str, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A writable ``.npy`` mapped from ``directory/name.npy``, to fill without a private copy."""
    return np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def write_chunks(directory: Path, name: str, dtype, length: int, chunks) -> None:
    """Write the 1-D ``directory/name.npy`` of ``length`` elements from consecutive ``chunks``
    (sequential writes: faster than filling a fresh map page fault by page fault)."""
    dtype = np.dtype(dtype)
    written = 0
    with open(directory / f"{name}.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": (length,)})
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            f.write(memoryview(chunk).cast("B"))
            written += len(chunk)
    if written != length:
        raise ValueError(f"{name}.npy: {written} elements written, {length} declared")


def _canonical(value):
    return json.loads(json.dumps(value, sort_keys=True))


def _write_manifest(directory: Path, key: dict, meta: dict) -> None:
    arrays = {}
    for path in sorted(directory.glob("*.npy")):
        with open(path, "rb") as f:  # the data must be on disk before the rename publishes it
            os.fsync(f.fileno())
        array = np.load(path, mmap_mode="r")
        size = path.stat().st_size
        arrays[path.stem] = {"dtype": array.dtype.str, "shape": list(array.shape), "bytes": size,
                             "digest": file_digest(path, size)}
        del array
    record = {"format": FORMAT, "version": VERSION, "key": key, "meta": meta, "arrays": arrays}
    with open(directory / MANIFEST, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _check(path: Path, key: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Map the arrays of the entry at ``path``; raises ValueError saying what is wrong."""
    try:
        record = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"manifest unreadable ({e.__class__.__name__})") from None
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise ValueError("manifest of another format or version")
    if record.get("key") != _canonical(key):
        raise ValueError("manifest describes another key")
    arrays = {}
    for name, spec in record["arrays"].items():
        file = path / f"{name}.npy"
        size = file.stat().st_size if file.is_file() else -1
        if size != spec["bytes"]:
            raise ValueError(f"{file.name} is {size} bytes, the manifest says {spec['bytes']}")
        if file_digest(file, size) != spec["digest"]:
            raise ValueError(f"{file.name} does not match its digest")
        array = np.load(file, mmap_mode="r", allow_pickle=False)
        if array.dtype.str != spec["dtype"] or list(array.shape) != spec["shape"]:
            raise ValueError(f"{file.name} holds {array.dtype.str}{list(array.shape)}, expected "
                             f"{spec['dtype']}{spec['shape']}")
        arrays[name] = array
    return arrays, record["meta"]


def open_entry(path: Path, key: dict) -> tuple[dict[str, np.ndarray], dict] | None:
    """The verified, memory-mapped arrays and metadata of an entry, or None when there is none.
    A corrupt entry is moved aside (with a warning) and reported as missing, so it is rebuilt."""
    if not path.exists():
        return None
    try:
        return _check(path, key)
    except (OSError, ValueError) as e:
        log.warning("megamix: index cache %s is damaged (%s); rebuilding it", path, e)
        _discard(path)
        return None


def _discard(path: Path) -> None:
    """Move an entry out of the way (atomically, so no reader maps half of it) and delete it."""
    aside = path.with_name(f".{path.name}.discard-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except OSError:
        return  # already moved by another process
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Best-effort exclusive lock for building ``path``; a file system without locks gets none (the
    atomic rename keeps racing builders correct, they only duplicate work)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        handle = open(lock_path, "a+")
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        handle.close()


def build_entry(path: Path, key: dict, build: Callable[[Path], dict]) -> None:
    """Make sure a valid entry exists at ``path``: build it when missing or damaged.

    ``build(directory)`` writes the arrays into ``directory`` (:func:`save_array`,
    :func:`write_chunks`, :func:`new_array`) and returns JSON-able metadata; the manifest is
    written and the directory renamed into place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(path):
        if open_entry(path, key) is not None:
            return
        tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            meta = build(tmp)
            _write_manifest(tmp, key, _canonical(meta))
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.exists():
                    raise  # a real failure, not a racing builder that published first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK`` from torchrun, ``SLURM_LOCALID`` under srun)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def _distributed() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def open_or_build(path: Path, key: dict, build: Callable[[Path], dict], *,
                  collective: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """The entry's mapped arrays and metadata, building it first if needed.

    ``collective``: every rank of a distributed run calls this at the same point (as in
    ``build_dataset``); local rank 0 of each node builds, all ranks wait at a barrier, then map.
    Otherwise (one process, or a lazy build inside a data-loader worker) the process builds under
    the lock if it finds no valid entry.
    """
    if collective and _distributed():
        import torch.distributed as dist

        failure = None
        if local_rank() == 0:
            try:
                build_entry(path, key, build)
            except Exception as e:  # reach the barrier anyway: the others must not wait forever
                failure = e
        dist.barrier()
        if failure is not None:
            raise failure
    for _ in range(3):  # a damaged or vanished entry is rebuilt here, by whoever finds it
        opened = open_entry(path, key)
        if opened is not None:
            return opened
        build_entry(path, key, build)
    raise CacheError(f"{path}: index cache entry could not be built and mapped")
