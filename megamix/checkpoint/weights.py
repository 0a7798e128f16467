"""The model's weights from any checkpoint: module by module (:class:`WeightReader`, what the
Hugging Face exporter streams), whole (:func:`read_weights`), or as a model (:func:`load_model`:
a checkpoint of any layout or engine → one plain single-process model, for export, analysis and
evaluation)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from megamix.checkpoint.dcp import load_checkpoint, read_tensors, tensor_metadata
from megamix.checkpoint.files import CheckpointError, checkpoint_config, checkpoint_format, resolve_checkpoint
from megamix.config import Config
from megamix.model import Transformer, layer_of


def module_groups(cfg: Config) -> list[list[tuple[str, torch.Size]]]:
    """The model's tensors as ``(name, shape)``, grouped by module in forward order: the
    embedding, each block, the final norm, the head (absent when tied to the embedding)."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.norm)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, tensor in model.state_dict().items():
        if cfg.model.tie_embeddings and name == "lm_head.weight":
            continue
        layer = layer_of(name)
        module = f"layers.{layer}" if layer is not None else name.split(".")[0]
        groups.setdefault(module, []).append((name, tensor.shape))
    return list(groups.values())


class WeightReader:
    """The weights of a checkpoint (or a run directory's latest), checked against its config.

    From DCP, :meth:`modules` reads one module at a time (DCP reads only the tensors asked for,
    reassembling TP/FSDP shards), so peak memory is about one block whatever the model's depth.
    DeepSpeed keeps the fp32 master weights as flat partitions of whole parameter groups, so they
    are reassembled all at once (peak memory: the fp32 model).
    """

    def __init__(self, checkpoint: str | os.PathLike):
        self.path = resolve_checkpoint(checkpoint)
        self.cfg = checkpoint_config(self.path)
        self.groups = module_groups(self.cfg)
        self.format = checkpoint_format(self.path)
        self._whole: dict[str, torch.Tensor] | None = None
        if self.format == "deepspeed":
            from megamix.checkpoint.deepspeed import read_full_state_dict

            self._whole = read_full_state_dict(self.path)
            stored = {name: (tuple(t.shape), t.dtype) for name, t in self._whole.items()}
        else:
            stored = {name: (tuple(meta.size), meta.properties.dtype)
                      for name, meta in tensor_metadata(self.path).items() if hasattr(meta, "size")}
        dtypes = set()
        for name, shape in self.entries:
            if name not in stored:
                raise CheckpointError(f"{self.path}: no tensor {name!r}; was it saved from this config?")
            if stored[name][0] != tuple(shape):
                raise CheckpointError(f"{self.path}: {name} has shape {stored[name][0]}, "
                                      f"the config says {tuple(shape)}")
            dtypes.add(stored[name][1])
        if len(dtypes) != 1:
            raise CheckpointError(f"{self.path}: mixed parameter dtypes {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()

    @property
    def entries(self) -> list[tuple[str, torch.Size]]:
        return [entry for group in self.groups for entry in group]

    def modules(self) -> Iterator[dict[str, torch.Tensor]]:
        """``{name: tensor}`` of each module in forward order, in the checkpoint's dtype."""
        for group in self.groups:
            if self._whole is not None:
                yield {name: self._whole[name] for name, _ in group}
            else:
                yield read_tensors(self.path, group, self.dtype)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every weight of the model a checkpoint holds, whole, by the single-process model's names."""
    weights: dict[str, torch.Tensor] = {}
    for module in WeightReader(path).modules():
        weights.update(module)
    return weights


def empty_model(cfg: Config, device: str | torch.device = "cpu") -> Transformer:
    """The config's model with allocated but uninitialized weights (built on the meta device first,
    so nothing is drawn twice) and its rotary tables computed."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.norm)
    model = model.to_empty(device=device)
    if cfg.model.tie_embeddings:  # to_empty gives each module its own new tensor
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights()  # the rotary tables; every weight is overwritten by the caller
    return model


def load_model(checkpoint_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Transformer:
    """A single-process model in eval mode from a checkpoint of any layout (or a run's latest)."""
    path = resolve_checkpoint(checkpoint_dir)
    cfg = checkpoint_config(path)
    model = empty_model(cfg, device)
    if checkpoint_format(path) == "deepspeed":
        from megamix.checkpoint.deepspeed import read_full_state_dict

        try:
            model.load_state_dict(read_full_state_dict(path))
        except RuntimeError as e:
            raise CheckpointError(f"{path}: its weights do not fit the model of its config.yaml ({e})") from None
    else:
        load_checkpoint(path, model)
    return model.eval()
