"""A Hugging Face Llama (or a megamix export) → a megamix run directory to fine-tune or evaluate.

``OUTPUT/config.yaml`` is the megamix config of the model, ``OUTPUT/checkpoints/step_0000000``
a regular DCP checkpoint of it (fp32 weights, as megamix trains) and ``OUTPUT/tokenizer`` a copy of
the model's tokenizer files, if it has any.  ``megamix.load_model`` reads the checkpoint on one
process, and ``megamix train --config OUTPUT/config.yaml --set data.path=...`` starts from it
(the config's ``train.output_dir`` is OUTPUT) on any parallel layout.  The checkpoint carries a
fresh optimizer (no moments yet) built from the config's ``train`` section, because resuming
restores the optimizer too: set the fine-tuning values of ``train.adam_*`` and
``train.weight_decay`` when importing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from megamix.checkpoint.dcp import save_checkpoint
from megamix.checkpoint.weights import empty_model
from megamix.config import Config, config_from_dict, parse_override, validate
from megamix.errors import MegamixError
from megamix.hf.adapter import config_from_hf, from_hf_name
from megamix.schemes import layer_schemes
from megamix.train.optim import build_optimizer


class HFImportError(MegamixError, ValueError):
    """A Hugging Face directory cannot be imported as asked (missing or mismatched weights, a used target)."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def hf_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors model directory (one file, or shards with an index)."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise HFImportError(f"{directory}: no model.safetensors(.index.json); only safetensors weights are read")
    for name in files:
        with safe_open(directory / name, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def import_config(hf_dir: Path, overrides: list[str] | tuple = ()) -> Config:
    """The megamix config of ``hf_dir/config.json``, with ``--set``-style overrides applied."""
    tree = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    for item in overrides:
        key, value = parse_override(item)
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return validate(config_from_dict(tree))


def import_hf(hf_dir: str | os.PathLike, output: str | os.PathLike, overrides: list[str] | tuple = ()) -> Path:
    """Convert ``hf_dir`` into the run directory ``output``; returns the checkpoint directory."""
    hf_dir, output = Path(hf_dir), Path(output)
    cfg = import_config(hf_dir, overrides)
    if (output / "checkpoints").exists():
        raise HFImportError(f"{output} already holds checkpoints; import into a new run directory")
    schemes = layer_schemes(cfg.norm, cfg.model.num_layers)
    model = empty_model(cfg)  # every weight is overwritten below
    params = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for hf_name, tensor in hf_tensors(hf_dir):
            if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer some old Llama checkpoints saved
                continue
            name = from_hf_name(hf_name, schemes)
            if name not in params:
                raise HFImportError(f"{hf_dir}: {hf_name} has no place in the model its config.json describes")
            expected = tuple(params[name].shape)
            if tuple(tensor.shape) != expected:
                raise HFImportError(f"{hf_dir}: {hf_name} has shape {tuple(tensor.shape)}, expected {expected}")
            params[name].copy_(tensor)
            loaded.add(name)
    if cfg.model.tie_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise HFImportError(f"{hf_dir}: no weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    optimizer = build_optimizer(model, cfg.train)
    cfg.train.output_dir = str(output)
    path = save_checkpoint(output, 0, model, optimizer, {"step": 0, "consumed_samples": 0})
    cfg.save(path / "config.yaml")
    cfg.save(output / "config.yaml")
    tokenizer_files = [hf_dir / name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
    if tokenizer_files:
        (output / "tokenizer").mkdir()
        for file in tokenizer_files:
            shutil.copyfile(file, output / "tokenizer" / file.name)
    return path
