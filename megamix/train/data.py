"""The data of a run: which samples each step reads, the validation batches, and the checks that
the corpus fits the model — the same for every layout and engine.

The training samples are addressed by one global index in an order that does not depend on the
run's length (``megamix.data``), so a step is named by the samples consumed before it: a run
extended from N to 2N steps reads exactly what a 2N-step run reads, and a resumed run whose global
batch size changed continues with the next unread sample.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megamix.config import Config
from megamix.data.gpt_dataset import (
    build_dataset,
    check_corpus,
    corpus_identity,
    deal_batches,
    validation_batches,
)
from megamix.data.loader import StepLoader


class RunData:
    """The training and validation datasets of ``cfg.data``, indexed once into ``data.cache_dir``
    (default ``OUTPUT_DIR/data_index``) and memory-mapped; ``num_samples`` is how far the training
    order must reach (it does not change the order)."""

    def __init__(self, cfg: Config, num_samples: int):
        d, t = cfg.data, cfg.train
        self.cfg = cfg
        cache_dir = Path(d.cache_dir) if d.cache_dir else Path(t.output_dir) / "data_index"
        fingerprint = None
        if d.tokenizer:
            from megamix.data.tokenizer import fingerprint as tokenizer_fingerprint
            from megamix.data.tokenizer import load_tokenizer

            fingerprint = tokenizer_fingerprint(load_tokenizer(d.tokenizer))
        for path in (d.path, d.valid_path):
            if path is not None:
                check_corpus(path, cfg.model.vocab_size, fingerprint)
        # data.split carves the validation documents out of data.path only without a valid_path.
        carve = d.valid_path is None
        self.train = build_dataset(d.path, "train", d.split, d.seq_len, d.seed, use_split=carve,
                                   num_samples=num_samples, cache_dir=cache_dir)
        self.valid = build_dataset(d.valid_path or d.path, "valid", d.split, d.seq_len, d.seed, use_split=carve,
                                   cache_dir=cache_dir)
        self.eval_batches = validation_batches(self.valid, t.eval_tokens, t.micro_batch_size, d.seq_len)

    def identity(self) -> dict:
        """What a checkpoint records of the data, to tell at resume whether it changed."""
        d = self.cfg.data
        return {"train": corpus_identity(d.path), "valid": corpus_identity(d.valid_path) if d.valid_path else None}

    def loader(self, first_sample: int, data_rank: tuple[int, int], device: torch.device) -> StepLoader:
        """This rank's micro-batches, step after step, from the step that starts at ``first_sample``."""
        t = self.cfg.train
        return StepLoader(self.train, first_sample, t.global_batch_size, t.micro_batch_size, *data_rank,
                          num_workers=self.cfg.data.num_workers, device=device,
                          vocab_size=self.cfg.model.vocab_size)

    def validation(self, data_rank: tuple[int, int], device: torch.device) -> list[torch.Tensor]:
        """This rank's share of the validation batches (batch b to data rank b mod dp), as tensors."""
        mine = deal_batches(self.eval_batches, *data_rank)
        return [torch.stack([self.valid[i] for i in batch]).to(device) for batch in mine]

    def probe(self, sequences: int, device: torch.device) -> torch.Tensor:
        """The depth statistics' probe batch ``[n, seq_len + 1]``: the first ``sequences`` samples of
        the (unshuffled) validation data, at most as many as it holds; the same on every rank."""
        count = min(sequences, len(self.valid))
        return torch.stack([self.valid[i] for i in range(count)]).to(device)
