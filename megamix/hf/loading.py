"""``megamix.load_model``: a checkpoint of any layout → one plain single-process model."""

from __future__ import annotations

import os

import torch

from megamix.config import load_config, validate
from megamix.model import Transformer
from megamix.train.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint


def load_model(checkpoint_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Transformer:
    path = resolve_checkpoint(checkpoint_dir)
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.yaml beside the checkpoint")
    cfg = validate(load_config(config_file))
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.norm)
    model = model.to_empty(device=device)
    if cfg.model.tie_embeddings:  # to_empty gives each module its own new tensor
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights()  # buffers (rotary tables); the weights come from the checkpoint
    load_checkpoint(path, model)
    return model.eval()
