"""Megatron's indexed token files: ``PREFIX.bin`` (token ids) + ``PREFIX.idx`` (the index).

The layout is Megatron-Core's ``IndexedDataset`` format, byte for byte, so corpora preprocessed
by either project are readable by the other.  ``.idx``, all little-endian::

    magic b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 S | u64 D
    int32[S] sequence lengths | int64[S] byte offsets into .bin | int64[D] document indices

Both files are memory-mapped; nothing is read until a sequence is asked for.  Every size in the
index is checked against the files on disk, so a truncated or mismatched pair fails loudly with
the file's name instead of returning garbage tokens.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from megamix.errors import MegamixError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDataError(MegamixError, ValueError):
    """A ``.bin``/``.idx`` pair is missing, truncated or inconsistent."""


def token_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's choice: uint16 below 65,500 entries, int32 above."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDataset:
    """Read-only, memory-mapped view of ``PREFIX.bin`` / ``PREFIX.idx``.

    ``ds[i]`` is sequence ``i`` as a NumPy array; ``ds.get(i, offset, length)`` reads a slice of
    it without touching the rest.  With one sequence per document (how text corpora are written),
    sequence and document are the same thing.
    """

    def __init__(self, prefix: str | os.PathLike, *, check_offsets: bool = True):
        """``check_offsets=False`` skips the one check that reads the whole index (every offset
        against the lengths: seconds for C4's 365M sequences); the training-data index passes it
        for a file it has already checked unchanged (:func:`megamix.data.index.open_corpus`)."""
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = _paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise IndexedDataError(f"{path}: file not found")
        self._read_index(check_offsets)
        self._bin = np.memmap(self.bin_path, dtype=np.uint8, mode="r") if self._bin_size else None

    def _read_index(self, check_offsets: bool = True) -> None:
        path = self.idx_path
        idx_size = path.stat().st_size
        if idx_size < HEADER_SIZE:
            raise IndexedDataError(f"{path}: truncated index ({idx_size} bytes, header is {HEADER_SIZE})")
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:9] != MAGIC:
            raise IndexedDataError(f"{path}: not a Megatron index file (bad magic {header[:9]!r})")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise IndexedDataError(f"{path}: unsupported index version {version}")
        code = header[17]
        if code not in DTYPE_CODES:
            raise IndexedDataError(f"{path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        num_seqs, num_doc_idx = struct.unpack("<QQ", header[18:34])
        expected = HEADER_SIZE + 12 * num_seqs + 8 * num_doc_idx
        # Multimodal files add one int8 mode per sequence; text files have nothing after.
        if idx_size not in (expected, expected + num_seqs):
            raise IndexedDataError(
                f"{path}: size {idx_size} bytes does not match its header "
                f"({num_seqs} sequences, {num_doc_idx} document indices → {expected} bytes); "
                "the file is truncated or corrupt"
            )
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(mm, np.int32, num_seqs, offset)
        offset += 4 * num_seqs
        self.sequence_pointers = np.frombuffer(mm, np.int64, num_seqs, offset)
        offset += 8 * num_seqs
        self.document_indices = np.frombuffer(mm, np.int64, num_doc_idx, offset)
        offset += 8 * num_doc_idx
        self.sequence_modes = (
            np.frombuffer(mm, np.int8, num_seqs, offset) if idx_size > expected else None
        )

        self._bin_size = self.bin_path.stat().st_size
        # The end of the last sequence, not a sum over all lengths: with the contiguity check below
        # it says the same, and a C4-sized index (365M sequences) is then read once, not twice.
        itemsize = self.dtype.itemsize
        total_bytes = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize if num_seqs else 0
        if total_bytes != self._bin_size:
            raise IndexedDataError(
                f"{self.bin_path}: {self._bin_size} bytes, but {path} describes {total_bytes}; "
                "the pair is truncated or does not belong together"
            )
        if num_seqs and self.sequence_pointers[0] != 0:
            raise IndexedDataError(f"{path}: sequence offsets are not contiguous")
        # In chunks, read from the file rather than through the map: whole-array temporaries would
        # be ~9 GB per process for a C4-sized index, and the map would keep its pages (4.4 GB) in
        # every rank's resident set after this one look.
        with open(path, "rb") as f:
            for lo in range(0, num_seqs - 1 if check_offsets else 0, 1 << 20):
                hi = min(lo + (1 << 20), num_seqs - 1)
                f.seek(HEADER_SIZE + 4 * lo)
                ends = np.fromfile(f, np.int32, hi - lo).astype(np.int64)
                f.seek(HEADER_SIZE + 4 * num_seqs + 8 * lo)
                pointers = np.fromfile(f, np.int64, hi - lo + 1)
                ends *= itemsize
                ends += pointers[:-1]
                if not np.array_equal(pointers[1:], ends):
                    raise IndexedDataError(f"{path}: sequence offsets are not contiguous")
        if num_doc_idx and (self.document_indices[0] != 0 or self.document_indices[-1] != num_seqs):
            raise IndexedDataError(f"{path}: document indices do not span the {num_seqs} sequences")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i``."""
        seq_len = int(self.sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"slice [{offset}, {offset + length}) outside sequence {i} of length {seq_len}")
        if length == 0:
            return np.empty(0, self.dtype)
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


class IndexedDatasetWriter:
    """Streams documents into ``PREFIX.bin`` / ``PREFIX.idx``.

    Everything is written under temporary names and renamed into place by :meth:`finalize`, so a
    crash never leaves a pair that looks complete.  One sequence per document (Megatron's layout
    for text without sentence splitting).  Use as a context manager, or call ``finalize``.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number] | np.dtype = np.uint16):
        self.bin_path, self.idx_path = _paths(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no Megatron code")
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[int] = []
        self._done = False

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.size and self.dtype.kind in "ui":
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(f"token id out of range for {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(int(arr.size))

    def add_lengths(self, lengths) -> None:
        """Record documents whose tokens were already appended with :meth:`write_raw`."""
        self._lengths.extend(int(n) for n in lengths)

    def write_raw(self, data: bytes) -> None:
        """Append pre-encoded token bytes (already in this writer's dtype)."""
        self._bin.write(data)

    def finalize(self) -> None:
        if self._done:
            return
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        write_index(self._tmp_idx, self.dtype, self._lengths)
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        self._done = True

    def abort(self) -> None:
        if not self._done:
            self._bin.close()
            for p in (self._tmp_bin, self._tmp_idx):
                p.unlink(missing_ok=True)
            self._done = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def write_index(path: str | os.PathLike, dtype, lengths) -> None:
    """Write a text ``.idx`` (one sequence per document) for sequences of the given lengths."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[dtype]))
        f.write(struct.pack("<QQ", len(lengths), len(doc_idx)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())
        f.flush()
        os.fsync(f.fileno())
