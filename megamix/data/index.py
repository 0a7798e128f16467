"""Which tokens a training sample holds: the order of documents and samples, epoch by epoch.

The order is defined one epoch at a time, each epoch from ``(seed, epoch)`` alone, and computed
only when a sample of that epoch is read.  Nothing depends on how many epochs or samples a run
asks for, so the sample at global index ``i`` is the same in a run of N steps and in the same run
extended to 2N (prefix stability), and a million epochs over a tiny corpus cost nothing until read.

The stream.  Epoch ``e`` lists the documents of the split in a random order (a Fisher-Yates shuffle
drawn from ``np.random.default_rng([seed, 0, e])``); the stream is the concatenation of epochs
0, 1, 2, ... of ``T`` tokens each (``T``: the split's tokens).  Raw sample ``j`` is the
``seq_len + 1`` tokens ``[j·s, j·s + s + 1)`` of the stream (inputs and next-token targets;
consecutive samples share a token).  A raw sample belongs to the epoch its first token lies in:
epoch ``e`` holds raw samples ``[first(e), first(e+1))`` with ``first(e) = ceil(e·T / s)``; the
last of them may run into the next epoch, which is just the stream continuing.

The sample order.  Global sample ``i`` lies in epoch ``e = i·s // T`` (the same epoch as raw sample
``i``, so every sample of epoch ``e`` comes before any of epoch ``e + 1``).  Within the epoch its
position ``p = i - first(e)`` is permuted inside a window of :data:`SHUFFLE_WINDOW` positions,
by a permutation drawn from ``default_rng([seed, 1, e, window])``.  Why windows and not the whole
epoch: the documents are already in a new random order each epoch, so the sample shuffle only has
to break up the runs of consecutive samples cut from one long document; 2^20 samples (268M tokens
at seq_len 256) do that thoroughly, a window's permutation takes ~15 ms to draw and 4 MiB to hold,
and so nothing per sample is ever stored.  Shuffling whole C4 epochs instead would add a 2.6 GB
array per epoch (4 bytes × 663M samples) to build, cache and map, for no measurable gain.

Validation ("valid", ``shuffle=False``) reads the split's documents in corpus order, unshuffled;
its token starts come straight from the ``.idx`` offsets, so it costs no memory at all.

What is stored.  A shuffled epoch is its document order (int32 when the ids fit) and the
cumulative token starts of that order (int64, one more than the documents).  For a split of at
least ``cache_min_documents`` documents with a ``cache_dir`` they are built once into the cache
(:mod:`megamix.data.cache`) and memory-mapped by every rank; smaller epochs (a 1M-document epoch
takes ~40 ms) are computed in memory on demand and the most recent few kept.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from megamix.data import cache
from megamix.data.errors import DataError
from megamix.data.indexed import IndexedDataset

ORDER_VERSION = 1  # bump when the definition of the order changes: it is part of every cache key
SHUFFLE_WINDOW = 1 << 20
CACHE_MIN_DOCUMENTS = 1 << 20  # smaller splits are computed in memory, never cached
MEMORY_EPOCHS = 4  # in-memory epochs (and shuffle windows) kept per process
CHUNK = 1 << 24  # elements per step when filling large arrays


def open_corpus(prefix: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> IndexedDataset:
    """``PREFIX.bin/.idx``, opened with its full offset check only once per version of the file.

    :class:`IndexedDataset` checks every offset against the lengths, which reads the whole ``.idx``:
    ~2 s per rank per start at C4 scale, most of a cached start.  With a ``cache_dir``, a large
    index that passed that check leaves a marker there named by the ``.idx``'s size, mtime and
    fingerprint (:func:`cache.corpus_fingerprint`); the same file, unchanged, then opens with the
    O(1) checks only (header, file sizes, first and last offsets).  Small corpora are always
    checked in full (it costs nothing).
    """
    if cache_dir is None:
        return IndexedDataset(prefix)
    stat = Path(str(prefix) + ".idx").stat()
    if stat.st_size < 12 * CACHE_MIN_DOCUMENTS:
        return IndexedDataset(prefix)
    key = {"kind": "idx-offsets-checked", "corpus": cache.corpus_fingerprint(prefix), "mtime_ns": stat.st_mtime_ns}
    marker = cache.entry_path(cache_dir, f"{Path(str(prefix)).name}.checked", key)
    if marker.is_file():
        return IndexedDataset(prefix, check_offsets=False)
    indexed = IndexedDataset(prefix)
    try:  # best effort: without it the next start checks again
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
        tmp.write_text(json.dumps(key) + "\n")
        os.replace(tmp, marker)
    except OSError:
        pass
    return indexed


def split_tokens(indexed: IndexedDataset, documents: range) -> int:
    """Tokens in a contiguous document range, in O(1) from the ``.idx`` offsets."""
    if len(documents) == 0:
        return 0
    lo, last = documents.start, documents.stop - 1
    end = int(indexed.sequence_pointers[last]) + int(indexed.sequence_lengths[last]) * indexed.dtype.itemsize
    return (end - int(indexed.sequence_pointers[lo])) // indexed.dtype.itemsize


class ShuffledEpoch:
    """One epoch's documents in its own random order: ``order[d]`` is the d-th document of the
    epoch, ``starts[d]`` its first token's offset within the epoch (``starts[-1]`` = T)."""

    def __init__(self, order: np.ndarray, starts: np.ndarray):
        self.order, self.starts = order, starts
        self.num_documents = len(order)

    def locate(self, offset: int) -> int:
        return int(np.searchsorted(self.starts, offset, side="right")) - 1

    def document(self, d: int) -> int:
        return int(self.order[d])

    def start(self, d: int) -> int:
        return int(self.starts[d])


class CorpusOrderEpoch:
    """The documents ``lo..hi`` in corpus order, located with the ``.idx`` byte offsets: nothing to
    build or hold (the validation split)."""

    def __init__(self, indexed: IndexedDataset, documents: range):
        self.indexed, self.lo, self.num_documents = indexed, documents.start, len(documents)
        self.pointers = indexed.sequence_pointers[documents.start:documents.stop]
        self.base = int(self.pointers[0]) if self.num_documents else 0
        self.itemsize = indexed.dtype.itemsize
        self.tokens = split_tokens(indexed, documents)

    def locate(self, offset: int) -> int:
        return int(np.searchsorted(self.pointers, self.base + offset * self.itemsize, side="right")) - 1

    def document(self, d: int) -> int:
        return self.lo + d

    def start(self, d: int) -> int:
        if d >= self.num_documents:
            return self.tokens
        return (int(self.pointers[d]) - self.base) // self.itemsize


class DocumentEpochs:
    """The token stream of a document range: epoch after epoch, each in its own document order.

    ``read(position, length, out)`` copies stream tokens ``[position, position + length)``.  Epochs
    are built (or mapped from the cache) when first needed; :meth:`prepare` does it up front, as a
    collective of all ranks, for the epochs a run will read.
    """

    def __init__(self, indexed: IndexedDataset, documents: range, seed: int, shuffle: bool = True, *,
                 cache_dir: str | os.PathLike | None = None, cache_min_documents: int = CACHE_MIN_DOCUMENTS):
        if seed < 0:
            raise ValueError(f"data seed must be non-negative, got {seed}")
        if documents.step != 1 or documents.start < 0 or documents.stop > len(indexed):
            raise ValueError(f"{indexed.prefix}: documents {documents} are not a range of its {len(indexed)}")
        self.indexed, self.documents, self.seed, self.shuffle = indexed, documents, seed, shuffle
        self.num_documents = len(documents)
        self.tokens_per_epoch = split_tokens(indexed, documents)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cached = shuffle and self.cache_dir is not None and self.num_documents >= cache_min_documents
        self.order_dtype = np.int32 if documents.stop <= np.iinfo(np.int32).max else np.int64
        self._fingerprint: dict | None = None
        self._mapped: dict[int, ShuffledEpoch] = {}
        self._memory: OrderedDict[int, ShuffledEpoch] = OrderedDict()
        self._corpus_order = None if shuffle else CorpusOrderEpoch(indexed, documents)
        self._fd: tuple[int, int] | None = None  # (pid, descriptor of the .bin)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd[0] == os.getpid():
            os.close(self._fd[1])

    # -- pickling (data-loader workers started by spawn/forkserver): reopen files, never copy maps
    def __getstate__(self) -> dict:
        state = dict(self.__dict__, indexed=self.indexed.prefix, _mapped={}, _memory=OrderedDict(), _fd=None)
        state["_corpus_order"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.indexed = IndexedDataset(state["indexed"], check_offsets=False)  # the pickling process checked it
        if not self.shuffle:
            self._corpus_order = CorpusOrderEpoch(self.indexed, self.documents)

    # -- epochs
    def cache_key(self, epoch: int) -> dict:
        if self._fingerprint is None:
            self._fingerprint = cache.corpus_fingerprint(self.indexed.prefix)
        return {"kind": "document-epoch", "order_version": ORDER_VERSION, "corpus": self._fingerprint,
                "documents": [self.documents.start, self.documents.stop], "seed": self.seed, "epoch": epoch}

    def _entry(self, epoch: int) -> tuple:
        key = self.cache_key(epoch)
        return cache.entry_path(self.cache_dir, f"{Path(self.indexed.prefix).name}.epoch{epoch}", key), key

    def document_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s documents, in order (a fresh permutation of the range each epoch)."""
        order = np.arange(self.num_documents, dtype=self.order_dtype)
        np.random.default_rng([self.seed, 0, epoch]).shuffle(order)
        if self.documents.start:
            order += self.order_dtype(self.documents.start)
        return order

    def _start_chunks(self, order: np.ndarray):
        """The token starts of ``order``, chunk by chunk: ``[0]``, then the running sums of the
        lengths of ``order[a:b]`` (``starts[d+1] = starts[d] + length(order[d])``)."""
        yield np.zeros(1, dtype=np.int64)
        carry = 0
        lengths = self.indexed.sequence_lengths
        for a in range(0, len(order), CHUNK):
            piece = np.cumsum(lengths[order[a:a + CHUNK]], dtype=np.int64)
            piece += carry
            carry = int(piece[-1])
            yield piece

    def _starts(self, order: np.ndarray) -> np.ndarray:
        return np.concatenate(list(self._start_chunks(order)))

    def _build(self, epoch: int, directory: Path) -> dict:
        order = self.document_order(epoch)
        cache.save_array(directory, "order", order)
        cache.write_chunks(directory, "starts", np.int64, self.num_documents + 1, self._start_chunks(order))
        return {"tokens": self.tokens_per_epoch}

    def _map(self, epoch: int, collective: bool) -> ShuffledEpoch:
        path, key = self._entry(epoch)
        arrays, meta = cache.open_or_build(path, key, lambda d: self._build(epoch, d), collective=collective)
        starts = arrays["starts"]
        if meta.get("tokens") != self.tokens_per_epoch or int(starts[-1]) != self.tokens_per_epoch or starts[0]:
            raise DataError(f"{path}: cached epoch does not add up to the split's {self.tokens_per_epoch} tokens "
                            "(was the corpus rewritten in place?); remove the entry to rebuild it")
        return ShuffledEpoch(arrays["order"], starts)

    def prepare(self, epochs) -> None:
        """Build or map the cached epochs among ``epochs`` now (every rank calls this together)."""
        if not self.cached:
            return
        for e in epochs:
            if e not in self._mapped:
                self._mapped[e] = self._map(e, collective=True)

    def epoch(self, e: int):
        if not self.shuffle:
            return self._corpus_order
        if e in self._mapped:
            return self._mapped[e]
        if self.cached:  # an epoch nobody prepared: build or map it here, under the build lock
            self._mapped[e] = self._map(e, collective=False)
            return self._mapped[e]
        if e in self._memory:
            self._memory.move_to_end(e)
            return self._memory[e]
        order = self.document_order(e)
        self._memory[e] = epoch = ShuffledEpoch(order, self._starts(order))
        if len(self._memory) > MEMORY_EPOCHS:
            self._memory.popitem(last=False)
        return epoch

    def _tokens(self, doc: int, offset: int, length: int) -> np.ndarray:
        """Tokens ``offset : offset + length`` of document ``doc``, read with ``pread``.

        Not through the ``.bin`` memory map: a page fault there reads around the faulting page
        (``read_ahead_kb``: 128 KB on most systems, 8 MB on some) where a sample needs ~0.5 KB at a
        random place, so mapped random reads run 100× slower than ``pread`` once the corpus
        exceeds the page cache.  The descriptor is opened per process (after a fork, too).
        """
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.indexed.bin_path, os.O_RDONLY))
        itemsize = self.indexed.dtype.itemsize
        start = int(self.indexed.sequence_pointers[doc]) + offset * itemsize
        data = os.pread(self._fd[1], length * itemsize, start)
        if len(data) != length * itemsize:
            raise DataError(f"{self.indexed.bin_path}: short read at byte {start} (the file shrank?)")
        return np.frombuffer(data, self.indexed.dtype)

    def read(self, position: int, length: int, out: np.ndarray) -> None:
        """Copy stream tokens ``[position, position + length)`` into ``out[:length]``."""
        e, offset = divmod(position, self.tokens_per_epoch)
        filled = 0
        read = self._tokens
        while filled < length:
            epoch = self.epoch(e)
            d = epoch.locate(offset)
            end = epoch.start(d)
            while filled < length and d < epoch.num_documents:
                start, end = end, epoch.start(d + 1)
                take = min(length - filled, end - offset)
                if take > 0:
                    out[filled:filled + take] = read(epoch.document(d), offset - start, take)
                    filled += take
                    offset += take
                d += 1
            e, offset = e + 1, 0


class SampleOrder:
    """Global sample index → raw sample index (see the module docstring): per-epoch, windowed."""

    def __init__(self, tokens_per_epoch: int, seq_len: int, seed: int, shuffle: bool = True,
                 window: int = SHUFFLE_WINDOW):
        self.tokens, self.seq_len, self.seed = tokens_per_epoch, seq_len, seed
        self.shuffle, self.window = shuffle, window
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _windows=OrderedDict())

    def first(self, epoch: int) -> int:
        """The first raw sample of ``epoch``: ``ceil(epoch·T / seq_len)``."""
        return -(-(epoch * self.tokens) // self.seq_len)

    def epoch_of(self, i: int) -> int:
        return i * self.seq_len // self.tokens

    def _permutation(self, epoch: int, w: int, size: int) -> np.ndarray:
        key = (epoch, w)
        perm = self._windows.get(key)
        if perm is None:
            perm = np.random.default_rng([self.seed, 1, epoch, w]).permutation(size).astype(np.int32)
            self._windows[key] = perm
            if len(self._windows) > MEMORY_EPOCHS:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        return perm

    def _window_of(self, epoch: int, p: int) -> tuple[int, int, int]:
        """(window, its first position, its size) of position ``p`` in ``epoch``."""
        w = p // self.window
        base = w * self.window
        size = min(self.window, self.first(epoch + 1) - self.first(epoch) - base)
        return w, base, size

    def raw(self, i: int) -> int:
        if not self.shuffle:
            return i
        e = self.epoch_of(i)
        first = self.first(e)
        w, base, size = self._window_of(e, i - first)
        return first + base + int(self._permutation(e, w, size)[i - first - base])

    def raw_many(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if not self.shuffle:
            return indices.copy()
        out = np.empty_like(indices)
        epochs = indices * self.seq_len // self.tokens
        firsts = -(-(epochs * self.tokens) // self.seq_len)
        windows = (indices - firsts) // self.window
        for e, w in {(int(e), int(w)) for e, w in zip(epochs, windows)}:
            sel = (epochs == e) & (windows == w)
            first = self.first(e)
            _, base, size = self._window_of(e, w * self.window)
            out[sel] = first + base + self._permutation(e, w, size)[indices[sel] - first - base]
        return out

    def epochs_read(self, num_samples: int) -> range:
        """The epochs whose tokens samples ``[0, num_samples)`` read: those they lie in, and the
        next one when the last epoch's final sample (which runs past the epoch's end) is among them."""
        if num_samples <= 0:
            return range(0)
        last = self.epoch_of(num_samples - 1)
        final = self.first(last + 1) - 1  # the raw sample that may run into epoch last + 1
        if self.shuffle:  # is the final raw sample among those the read positions of its window map to?
            w, base, size = self._window_of(last, final - self.first(last))
            read = num_samples - self.first(last) - base
            reaches = read > 0 and final - self.first(last) - base in self._permutation(last, w, size)[:read]
        else:
            reaches = num_samples - 1 >= final
        spills = final * self.seq_len + self.seq_len + 1 > (last + 1) * self.tokens
        return range(last + 2 if reaches and spills else last + 1)
