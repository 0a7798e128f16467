"""Shared fixtures: tiny configs and tiny token corpora written with our .bin/.idx writer."""

from __future__ import annotations

import numpy as np
import pytest

from megamix.config import load_config
from megamix.data.indexed import IndexedDatasetWriter

TINY = [
    "model.vocab_size=512",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.num_layers=4",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.steps=20",
    "train.warmup_steps=2",
    "train.log_interval=1",
    "train.eval_interval=10",
    "train.eval_steps=2",
    "train.tensorboard=false",
    "train.progress_bar=false",
]


def write_corpus(prefix, num_docs: int = 200, vocab: int = 512, seed: int = 0) -> list[np.ndarray]:
    """Documents with learnable structure: each continues an arithmetic pattern mod ``vocab``."""
    rng = np.random.default_rng(seed)
    docs = []
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(num_docs):
            start, stride, n = rng.integers(0, vocab), rng.integers(1, 5), rng.integers(5, 60)
            doc = ((start + stride * np.arange(n)) % vocab).astype(np.uint16)
            docs.append(doc)
            w.add_document(doc)
    return docs


@pytest.fixture
def corpus(tmp_path):
    prefix = tmp_path / "corpus"
    docs = write_corpus(prefix)
    return str(prefix), docs


@pytest.fixture
def tiny_config(tmp_path, corpus):
    def make(*overrides):
        return load_config(None, TINY + [f"data.path={corpus[0]}", f"train.output_dir={tmp_path / 'run'}", *overrides])

    return make
