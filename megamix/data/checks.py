"""Checks that a corpus belongs to the model, before the first step and batch by batch.

:func:`check_corpus` reads each corpus's sidecar (``PREFIX.json``, :mod:`megamix.data.sidecar`) and
refuses up front a corpus whose largest token id does not fit ``model.vocab_size`` or that another
tokenizer wrote.  A corpus without a sidecar (written by Megatron's tool) passes; its batches are
checked as they are read (:func:`check_tokens`, a max over each batch: microseconds).
:func:`corpus_identity` is what a checkpoint records to tell, at resume, whether the data changed.
"""

from __future__ import annotations

import os

import numpy as np

from megamix.config import parse_blend
from megamix.data import cache
from megamix.data.errors import DataError
from megamix.data.index import split_tokens
from megamix.data.indexed import IndexedDataset
from megamix.data.sidecar import read_sidecar


def _prefixes(path_or_blend) -> list[tuple[float, str]]:
    if isinstance(path_or_blend, os.PathLike):
        path_or_blend = os.fspath(path_or_blend)
    return parse_blend(path_or_blend, "data.path")


def check_corpus(path_or_blend, vocab_size: int, tokenizer_fingerprint: str | None = None) -> None:
    """Raise :class:`DataError` for a corpus whose sidecar says its token ids reach ``vocab_size``,
    that a tokenizer other than ``tokenizer_fingerprint`` wrote (when given), or whose counts are
    not those of its ``.idx`` (the sidecar of another corpus).  Corpora without a sidecar pass."""
    for _, prefix in _prefixes(path_or_blend):
        record = read_sidecar(prefix)
        if record is None:
            continue
        if record["max_id"] >= vocab_size:
            raise DataError(f"{prefix}.bin: holds token ids up to {record['max_id']} (its sidecar {prefix}.json "
                            f"says), >= model.vocab_size {vocab_size}")
        found = record["tokenizer"]["fingerprint"]
        if tokenizer_fingerprint is not None and found != tokenizer_fingerprint:
            name = record["tokenizer"].get("name")
            raise DataError(f"{prefix}: written by tokenizer {name!r} with fingerprint {found[:16]}…, the run's "
                            f"tokenizer has fingerprint {tokenizer_fingerprint[:16]}…")
        indexed = IndexedDataset(prefix)
        tokens = split_tokens(indexed, range(len(indexed)))
        if record["documents"] != len(indexed) or record["tokens"] != tokens:
            raise DataError(f"{prefix}.json describes {record['documents']} documents and {record['tokens']} "
                            f"tokens; the .idx holds {len(indexed)} and {tokens}: not this corpus's sidecar")


def corpus_identity(path_or_blend) -> dict:
    """A JSON-able description of the data that changes when the data does: per prefix its weight,
    path and either its sidecar's tokenizer fingerprint and counts or (no sidecar) the cheap
    fingerprint of its files (sizes and a digest of sampled ``.idx`` pages; never reads ``.bin``)."""
    corpora = []
    for weight, prefix in _prefixes(path_or_blend):
        entry: dict = {"prefix": str(prefix), "weight": weight}
        record = read_sidecar(prefix)
        if record is not None:
            entry.update(tokenizer_fingerprint=record["tokenizer"]["fingerprint"], documents=record["documents"],
                         tokens=record["tokens"], max_id=record["max_id"])
        else:
            entry.update(cache.corpus_fingerprint(prefix))
        corpora.append(entry)
    return {"corpora": corpora}


def check_tokens(tokens: np.ndarray, vocab_size: int, indices, source) -> None:
    """Raise :class:`DataError` when a batch ``tokens`` ([n, seq_len + 1], one row per global sample
    ``indices[r]``) holds an id outside ``[0, vocab_size)``; ``source(i)`` names sample i's corpus."""
    if tokens.size == 0:
        return
    if int(tokens.max()) < vocab_size and int(tokens.min()) >= 0:
        return
    bad = (tokens >= vocab_size) | (tokens < 0)
    row = int(np.nonzero(bad.any(axis=1))[0][0])
    token = int(tokens[row][bad[row]][0])
    sample = int(indices[row])
    raise DataError(f"{source(sample)}.bin: sample {sample} holds token id {token} "
                    f"{'>= model.vocab_size' if token >= 0 else 'below 0 for model.vocab_size'} {vocab_size}")
