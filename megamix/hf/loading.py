"""``megamix.load_model``: a checkpoint of any layout → one plain single-process model.

DCP checkpoints (FSDP2, any layout) are read by DCP; DeepSpeed checkpoints (``parallel.engine:
deepspeed``, any ZeRO stage) by DeepSpeed's ``zero_to_fp32`` with ``weights_only`` unpickling
(:func:`megamix.parallel.deepspeed_engine.read_full_state_dict`; needs DeepSpeed installed).
"""

from __future__ import annotations

import os

import torch

from megamix.model import Transformer
from megamix.train.checkpoint import checkpoint_config, checkpoint_format, load_checkpoint, resolve_checkpoint


def load_model(checkpoint_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Transformer:
    path = resolve_checkpoint(checkpoint_dir)
    cfg = checkpoint_config(path)
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.norm)
    model = model.to_empty(device=device)
    if cfg.model.tie_embeddings:  # to_empty gives each module its own new tensor
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights()  # buffers (rotary tables); the weights come from the checkpoint
    if checkpoint_format(path) == "deepspeed":
        from megamix.parallel.deepspeed_engine import read_full_state_dict

        model.load_state_dict(read_full_state_dict(path))
    else:
        load_checkpoint(path, model)
    return model.eval()
