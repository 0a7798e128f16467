"""Packed, shuffled, blended training samples, addressed by one global sample index.

A :class:`GPTDataset` concatenates the documents of a split (a new seeded random order each epoch)
into one token stream and cuts it into samples of ``seq_len + 1`` tokens (inputs plus the
next-token targets; consecutive samples share one token), Megatron-style; the samples are shuffled
within each epoch.  The order is defined epoch by epoch from ``(seed, epoch)`` and computed lazily
(:mod:`megamix.data.index`), so sample ``i`` is the same however many samples a run asks for, and
large epochs are built once into a cache directory and memory-mapped by every rank
(:mod:`megamix.data.cache`).

:class:`BlendedDataset` mixes several datasets by weight with Megatron's greedy rule
(:mod:`megamix.data.blend`), :func:`micro_batches` says which global samples a data-parallel rank
reads in the optimizer step that starts at a given sample, and :func:`validation_batches` sizes
evaluation in tokens.  The only position a run needs to resume is the number of samples consumed,
which is the same whatever the data-parallel size or a later global batch size.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from megamix.config import parse_blend, parse_split
from megamix.data.blend import blend_index, blend_length, greedy_blend, normalized
from megamix.data.checks import check_corpus, check_tokens, corpus_identity
from megamix.data.errors import DataError
from megamix.data.index import CACHE_MIN_DOCUMENTS, SHUFFLE_WINDOW, DocumentEpochs, SampleOrder, open_corpus
from megamix.data.indexed import IndexedDataset

__all__ = [
    "CACHE_MIN_DOCUMENTS", "SHUFFLE_WINDOW", "BlendedDataset", "DataError", "GPTDataset", "blend_indices",
    "build_dataset", "check_corpus", "check_tokens", "corpus_identity", "deal_batches", "micro_batches",
    "read_batch", "split_documents", "validation_batches",
]


def split_documents(num_docs: int, split: str) -> dict[str, range]:
    """Contiguous train/validation document ranges, by the shares in ``split`` (e.g. "98,2")."""
    train_share, valid_share = parse_split(split)
    boundary = int(round(train_share * num_docs))
    if valid_share > 0 and num_docs > 1:
        boundary = min(boundary, num_docs - 1)
    if train_share > 0:
        boundary = max(boundary, 1)
    return {"train": range(0, boundary), "valid": range(boundary, num_docs)}


def _as_range(documents) -> range:
    """A contiguous document range (splits always are one), from a range or an array of ids."""
    if isinstance(documents, range):
        return documents
    docs = np.asarray(documents, dtype=np.int64)
    if len(docs) == 0:
        return range(0)
    if not np.array_equal(docs, np.arange(docs[0], docs[0] + len(docs))):
        raise ValueError("documents must be a contiguous range of document ids")
    return range(int(docs[0]), int(docs[0]) + len(docs))


class _Samples(torch.utils.data.Dataset):
    """``num_samples`` samples addressed by global index."""

    num_samples: int

    def __len__(self) -> int:
        return self.num_samples

    def _check(self, i: int) -> None:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside [0, {self.num_samples})")


class GPTDataset(_Samples):
    """Samples of ``seq_len + 1`` tokens cut from the documents ``documents`` of ``indexed``.

    ``shuffle`` (training): documents in a new order each epoch and samples shuffled within
    epochs, endlessly; ``num_samples`` (None: one epoch) only sets ``len``, and epochs are built
    when read.  Without ``shuffle`` (validation): one pass in corpus order, at most
    ``num_samples`` samples.  ``cache_dir``: where epochs of a split of at least
    ``cache_min_documents`` documents are built once and mapped (None: everything in memory).
    ``shuffle_window``: samples are shuffled within windows of this many positions of an epoch
    (part of the order's definition: keep the default except to test the windows).
    """

    def __init__(self, indexed: IndexedDataset, documents, seq_len: int, num_samples: int | None = None,
                 seed: int = 0, shuffle: bool = True, *, cache_dir: str | os.PathLike | None = None,
                 cache_min_documents: int = CACHE_MIN_DOCUMENTS, shuffle_window: int = SHUFFLE_WINDOW):
        self.seq_len = seq_len
        self.epochs = DocumentEpochs(indexed, _as_range(documents), seed, shuffle, cache_dir=cache_dir,
                                     cache_min_documents=cache_min_documents)
        tokens = self.epochs.tokens_per_epoch
        if tokens <= seq_len:
            raise DataError(f"{indexed.prefix}: {tokens} tokens in this split, fewer than one sample of {seq_len + 1}")
        self.order = SampleOrder(tokens, seq_len, seed, shuffle, shuffle_window)
        if shuffle:
            self.num_samples = self.order.first(1) if num_samples is None else num_samples
        else:
            available = (tokens - 1) // seq_len
            self.num_samples = available if num_samples is None else min(num_samples, available)
        self.epochs.prepare(self.order.epochs_read(self.num_samples))

    @property
    def indexed(self) -> IndexedDataset:
        return self.epochs.indexed

    @property
    def prefix(self) -> str:
        return self.epochs.indexed.prefix

    @property
    def tokens_per_epoch(self) -> int:
        return self.epochs.tokens_per_epoch

    def epoch_of(self, i: int) -> int:
        """The epoch sample ``i`` belongs to."""
        return self.order.epoch_of(i)

    def document_order(self, epoch: int) -> np.ndarray:
        """The documents of ``epoch``, in the order the stream holds them."""
        if not self.epochs.shuffle:
            return np.arange(self.epochs.documents.start, self.epochs.documents.stop)
        return self.epochs.document_order(epoch)

    def raw_sample(self, i: int) -> int:
        """The stream position of sample ``i``, in samples: its tokens are ``[j·s, j·s + s + 1)``."""
        self._check(i)
        return self.order.raw(i)

    def tokens(self, i: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of sample ``i``."""
        out = np.empty(self.seq_len + 1, dtype=self.indexed.dtype)
        self.epochs.read(self.raw_sample(i) * self.seq_len, self.seq_len + 1, out)
        return out

    def read_batch(self, indices) -> np.ndarray:
        """Samples ``indices`` as one int64 array ``[len(indices), seq_len + 1]``."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"samples {indices.tolist()} outside [0, {self.num_samples})")
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, j in zip(out, self.order.raw_many(indices).tolist()):
            self.epochs.read(j * self.seq_len, self.seq_len + 1, row)
        return out

    def source(self, i: int) -> str:
        """The corpus prefix sample ``i`` is read from."""
        return self.prefix

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens(int(i)).astype(np.int64))


def blend_indices(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend: sample k comes from the dataset furthest behind its weight.

    Returns (dataset index, sample index within that dataset) for each of ``num_samples``.
    """
    which, within, _ = greedy_blend(weights, num_samples)
    return which.astype(np.int64), within


class BlendedDataset(_Samples):
    """Datasets mixed by ``weights``: sample ``k`` is sample ``within[k]`` of dataset ``which[k]``.

    ``num_samples`` None: until the first dataset runs out.  Raises :class:`DataError` when a
    dataset cannot supply its share of ``num_samples``.
    """

    def __init__(self, datasets: list, weights: list[float], num_samples: int | None = None, *,
                 cache_dir: str | os.PathLike | None = None, index: tuple | None = None):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets for {len(weights)} weights")
        self.datasets = datasets
        self.weights = normalized(weights)
        if num_samples is None:
            num_samples = blend_length(self.weights, [len(ds) for ds in datasets])
        self.which, self.within, counts = index if index is not None else blend_index(self.weights, num_samples,
                                                                                       cache_dir)
        self.num_samples = num_samples
        for ds, needed in zip(datasets, counts.tolist()):
            if needed > len(ds):
                raise DataError(f"{ds.prefix}: the blend needs {needed} samples of it, it has {len(ds)}")

    @property
    def seq_len(self) -> int:
        return self.datasets[0].seq_len

    # Pickled for data-loader workers started by spawn/forkserver: a mapped index travels as its
    # file name (pickling a memmap would copy it, 770 MB for 77M samples).
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in ("which", "within"):
            array = state[name]
            if isinstance(array, np.memmap) and array.filename:
                state[name] = ("npy", array.filename, len(array))
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("which", "within"):
            if isinstance(state[name], tuple):
                _, filename, length = state[name]
                state[name] = np.load(filename, mmap_mode="r")[:length]
        self.__dict__.update(state)

    def source(self, i: int) -> str:
        self._check(i)
        return self.datasets[int(self.which[i])].source(int(self.within[i]))

    def read_batch(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"samples {indices.tolist()} outside [0, {self.num_samples})")
        which = np.asarray(self.which[indices], dtype=np.int64)
        within = np.asarray(self.within[indices])
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for d in np.unique(which).tolist():
            rows = which == d
            out[rows] = self.datasets[d].read_batch(within[rows])
        return out

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        self._check(i)
        return self.datasets[int(self.which[i])][int(self.within[i])]


def read_batch(dataset, indices) -> np.ndarray:
    """Samples ``indices`` of any of our datasets as one int64 array ``[n, seq_len + 1]``."""
    if hasattr(dataset, "read_batch"):
        return dataset.read_batch(indices)
    return torch.stack([dataset[int(i)] for i in indices]).numpy()


def build_dataset(path, split_name: str, split: str, seq_len: int, seed: int, *, use_split: bool = True,
                  num_samples: int | None = None, cache_dir: str | os.PathLike | None = None,
                  cache_min_documents: int = CACHE_MIN_DOCUMENTS) -> torch.utils.data.Dataset:
    """The dataset for ``split_name`` ("train" or "valid") of a prefix or a weighted blend.

    ``use_split``: divide each prefix's documents by ``split`` and take the ``split_name`` part
    (validation carved from the training corpus); False: use every document (the trainer passes
    False for training data when ``data.valid_path`` names a separate validation corpus, and for
    that corpus).  "train" is shuffled, endless and prefix-stable, ``len`` = ``num_samples`` (None:
    one epoch); "valid" is one pass in corpus order, at most ``num_samples`` samples.
    """
    if split_name not in ("train", "valid"):
        raise ValueError(f"split_name must be 'train' or 'valid', got {split_name!r}")
    if num_samples == 0:  # v0.1 spelled "all of it" as 0
        num_samples = None
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    blend = parse_blend(path, "data.path")
    if not blend:
        raise ValueError("no data path given")
    shuffle = split_name == "train"

    def part(i: int, prefix: str, samples: int | None) -> GPTDataset:
        indexed = open_corpus(prefix, cache_dir)
        docs = split_documents(len(indexed), split)[split_name] if use_split else range(len(indexed))
        if len(docs) == 0:
            raise DataError(f"{prefix}: no documents in the {split_name} split ({split})")
        return GPTDataset(indexed, docs, seq_len, samples, seed + 7919 * i, shuffle=shuffle, cache_dir=cache_dir,
                          cache_min_documents=cache_min_documents)

    if len(blend) == 1:
        return part(0, blend[0][1], num_samples)
    weights = [w for w, _ in blend]
    if shuffle and num_samples is not None:
        # Training parts never run out (epochs repeat): each is asked for exactly its share.
        index = blend_index(weights, num_samples, cache_dir)
        parts = [part(i, prefix, int(n)) for i, ((_, prefix), n) in enumerate(zip(blend, index[2].tolist()))]
        return BlendedDataset(parts, weights, num_samples, index=index)
    parts = [part(i, prefix, None) for i, (_, prefix) in enumerate(blend)]
    length = blend_length(weights, [len(p) for p in parts], num_samples)
    return BlendedDataset(parts, weights, length, cache_dir=cache_dir)


def micro_batches(first_sample: int, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                  dp_size: int = 1) -> list[list[int]]:
    """The global sample indices a data-parallel rank reads in the optimizer step that starts at
    global sample ``first_sample``.

    The step reads samples ``[first_sample, first_sample + G)`` whatever the layout, cut into rounds
    of ``micro_batch_size × dp_size`` samples, of which data rank r takes its contiguous slice.
    Addressing steps by their first sample (the samples consumed before them) rather than by
    ``step × G`` lets a resumed run continue where it stopped after a change of global batch size.
    """
    per_round = micro_batch_size * dp_size
    if global_batch_size % per_round:
        raise ValueError(f"global batch size {global_batch_size} is not a multiple of micro_batch_size × dp "
                         f"= {micro_batch_size} × {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    rounds = []
    for r in range(global_batch_size // per_round):
        base = first_sample + r * per_round + dp_rank * micro_batch_size
        rounds.append(list(range(base, base + micro_batch_size)))
    return rounds


def validation_batches(dataset, num_tokens: int, micro_batch_size: int, seq_len: int) -> list[list[int]]:
    """The validation micro-batches for a budget of ``num_tokens`` tokens, the same on every layout.

    The first ``ceil(num_tokens / seq_len)`` samples of the (unshuffled) validation dataset, rounded
    down to whole micro-batches, at least one, at most what the dataset holds; each batch is a list
    of sample indices.  :func:`deal_batches` gives a data-parallel rank its share.
    """
    wanted = min(math.ceil(num_tokens / seq_len), len(dataset))
    count = min(max(1, wanted // micro_batch_size), len(dataset) // micro_batch_size)
    if count == 0:
        raise DataError(f"the validation data holds {len(dataset)} samples of {seq_len + 1} tokens, fewer than "
                        f"one micro-batch of {micro_batch_size}")
    return [list(range(b * micro_batch_size, (b + 1) * micro_batch_size)) for b in range(count)]


def deal_batches(batches: list[list[int]], dp_rank: int, dp_size: int) -> list[list[int]]:
    """Data-parallel rank ``dp_rank``'s share of ``batches``: batch b goes to rank ``b mod dp_size``."""
    return batches[dp_rank::dp_size]
