"""Packed, shuffled, blended training samples, addressed by one global sample index.

A :class:`GPTDataset` concatenates the documents of a split (in a seeded random order, a new
order each epoch) into one token stream and cuts it into samples of ``seq_len + 1`` tokens
(inputs plus the next-token targets; consecutive samples share one token), Megatron-style.  The
samples are then shuffled within each epoch.  Nothing is materialized per sample: sample ``i``
is located with a binary search over the documents' cumulative lengths.

:class:`BlendedDataset` mixes several datasets by weight with Megatron's deterministic greedy
rule, and :func:`micro_batches` says which global samples a data-parallel rank reads at a step.
The only position a run needs to resume is the number of samples consumed, which is the same
whatever the data-parallel size.
"""

from __future__ import annotations

import numpy as np
import torch

from megamix.config import parse_blend, parse_split
from megamix.data.indexed import IndexedDataset


def split_documents(num_docs: int, split: str) -> dict[str, np.ndarray]:
    """Contiguous train/validation document ranges, by the shares in ``split`` (e.g. "98,2")."""
    train_share, valid_share = parse_split(split)
    boundary = int(round(train_share * num_docs))
    if valid_share > 0 and num_docs > 1:
        boundary = min(boundary, num_docs - 1)
    if train_share > 0:
        boundary = max(boundary, 1)
    return {"train": np.arange(0, boundary), "valid": np.arange(boundary, num_docs)}


class GPTDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        indexed: IndexedDataset,
        documents: np.ndarray,
        seq_len: int,
        num_samples: int,
        seed: int,
        shuffle: bool = True,
    ):
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

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, i: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of sample ``i``."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside [0, {self.num_samples})")
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

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens(i).astype(np.int64))


def blend_indices(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend: sample k comes from the dataset furthest behind its weight.

    Returns (dataset index, sample index within that dataset) for each of ``num_samples``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    which = np.empty(num_samples, dtype=np.int64)
    within = np.empty(num_samples, dtype=np.int64)
    counts = np.zeros(len(weights), dtype=np.int64)
    for k in range(num_samples):
        d = int(np.argmax(weights * (k + 1) - counts))
        which[k], within[k] = d, counts[d]
        counts[d] += 1
    return which, within


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: list[GPTDataset], weights: list[float], num_samples: int):
        self.datasets = datasets
        self.which, self.within = blend_indices(weights, num_samples)
        for d, ds in enumerate(datasets):
            needed = int((self.which == d).sum())
            if needed > len(ds):
                raise ValueError(f"{ds.indexed.prefix}: blend needs {needed} samples, the dataset has {len(ds)}")

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.datasets[self.which[i]][int(self.within[i])]


def build_dataset(
    path, split_name: str, split: str, seq_len: int, num_samples: int, seed: int, use_split: bool = True
) -> torch.utils.data.Dataset:
    """The dataset for ``split_name`` ("train" or "valid") of a prefix or a weighted blend.

    With ``use_split`` the documents of each prefix are divided by ``split``; without it (a
    separate validation corpus) every document is used.
    """
    blend = parse_blend(path, "data.path")
    parts, weights = [], []
    for i, (weight, prefix) in enumerate(blend):
        indexed = IndexedDataset(prefix)
        docs = split_documents(len(indexed), split)[split_name] if use_split else np.arange(len(indexed))
        if len(docs) == 0:
            raise ValueError(f"{prefix}: no documents in the {split_name} split ({split})")
        # Ask each part for a little more than its share so the greedy blend never runs out.
        want = int(np.ceil(weight * num_samples * 1.01)) + 1 if len(blend) > 1 else num_samples
        parts.append(GPTDataset(indexed, docs, seq_len, want, seed + 7919 * i, shuffle=split_name == "train"))
        weights.append(weight)
    if len(parts) == 1:
        return parts[0]
    return BlendedDataset(parts, weights, num_samples)


def micro_batches(
    step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1
) -> list[list[int]]:
    """The global sample indices a data-parallel rank reads at optimizer step ``step``.

    The global batch of step k is samples ``[k·G, (k+1)·G)`` whatever the layout; it is cut into
    micro-batches of ``micro_batch_size × dp_size`` samples, of which this rank takes its slice.
    """
    per_round = micro_batch_size * dp_size
    first = step * global_batch_size
    rounds = []
    for r in range(global_batch_size // per_round):
        base = first + r * per_round + dp_rank * micro_batch_size
        rounds.append(list(range(base, base + micro_batch_size)))
    return rounds
