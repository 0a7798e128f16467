"""A Hugging Face Llama, a megamix export or a checkpoint of the papers' reference code → a
megamix run directory to fine-tune or evaluate.

Weights are read from safetensors or from ``pytorch_model.bin`` (transformers 4.31's format, which
the reference code saved), one file or shards with an index; a ``.bin`` is unpickled with
``torch.load(weights_only=True)``, so a planted object is refused unread (:class:`UnsafeWeightsError`).
The placement comes from ``config.json`` (a megamix export), from the reference's ``NORM_TYPE`` /
``POST_NUM`` (:class:`ReferencePlacement`, ``megamix.hf.reference``), or from ``--set norm.*``.
Before anything is written the imported model's logits are compared with transformers' model of
the same directory (:func:`verify_import`).

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
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megamix.checkpoint.dcp import save_checkpoint
from megamix.checkpoint.weights import empty_model
from megamix.config import Config, config_from_dict, parse_override, validate
from megamix.errors import MegamixError
from megamix.hf.adapter import config_from_hf, from_hf_name, hf_config, is_stock_llama
from megamix.hf.reference import reference_norm_config, reference_type
from megamix.model import Transformer
from megamix.schemes import describe_schemes, layer_schemes
from megamix.train.optim import build_optimizer


class HFImportError(MegamixError, ValueError):
    """A Hugging Face directory cannot be imported as asked (missing or mismatched weights, a used target)."""


class UnsafeWeightsError(HFImportError):
    """A ``pytorch_model.bin`` whose pickle names something other than tensors: never unpickled."""


class ImportVerificationError(HFImportError):
    """The imported model does not compute the Hugging Face model's logits."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# (index, single file) of each weight format, in transformers' order of preference.
WEIGHT_FORMATS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory: safetensors, else ``pytorch_model.bin`` (what
    transformers 4.31, the reference code's version, wrote), one file or shards with an index."""
    for index_name, single in WEIGHT_FORMATS:
        index = directory / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise HFImportError(f"{index}: not a weight index ({e})") from None
            for name in names:  # shard names are plain file names beside the index
                if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                    raise HFImportError(f"{index}: the shard name {name!r} is not a file name in {directory}")
                if not (directory / name).is_file():
                    raise HFImportError(f"{index} names {name}, which is missing")
            return [directory / name for name in names]
        if (directory / single).is_file():
            return [directory / single]
    raise HFImportError(f"{directory}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, read with ``torch.load(weights_only=True)``: tensors and plain
    containers only, so a planted object is refused before it is ever constructed."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the pre-1.6 (non-zip) format
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "global" in line.lower()), lines[0] if lines else type(e).__name__)
        raise UnsafeWeightsError(f"{path}: refused to unpickle: it holds more than tensors ({detail.rstrip('.')}); "
                                 "weights are read with torch.load(weights_only=True)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise HFImportError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise HFImportError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def hf_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a model directory (safetensors or ``pytorch_model.bin``, whole or sharded)."""
    from safetensors import safe_open

    for file in weight_files(directory):
        if file.suffix == ".bin":
            yield from load_bin(file).items()
            continue
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


@dataclass(frozen=True)
class ReferencePlacement:
    """The reference code's placement of a checkpoint: its ``NORM_TYPE`` and ``POST_NUM``
    environment variables (docs/reference_code.md), which its ``config.json`` does not record."""

    norm_type: str
    post_num: int | None = None


def import_config(hf_dir: Path, overrides: list[str] | tuple = (), reference: ReferencePlacement | None = None,
                  ) -> Config:
    """The megamix config of ``hf_dir/config.json``: its placement from the file (a megamix export),
    from ``reference``, or Pre-LN (a Llama); then ``--set``-style overrides."""
    fields = json.loads((hf_dir / "config.json").read_text())
    tree = config_from_hf(fields)
    if reference is not None:
        if fields.get("model_type") == "megamix":
            raise HFImportError(f"{hf_dir}: its config.json already says where each norm goes (a megamix export); "
                                "--reference-norm-type is for the reference code's checkpoints")
        tree["norm"] = reference_norm_config(reference.norm_type, reference.post_num, tree["model"]["num_layers"])
    for item in overrides:
        key, value = parse_override(item)
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return validate(config_from_dict(tree))


def _skipped(name: str, reference: ReferencePlacement | None) -> bool:
    """Tensors a checkpoint may hold that are not weights of the model: the rotary ``inv_freq``
    buffer old Llama checkpoints (and the reference's) saved, and what the reference's model file
    builds for a placement that does not use it."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    unused = reference_type(reference.norm_type).unused_tensors if reference is not None else ()
    return any(name.startswith("model.layers.") and name.endswith("." + t) for t in unused)


_POST_LN_NAMES = ("post_feedforward_layernorm", "pre_feedforward_layernorm")


def read_hf_model(hf_dir: str | os.PathLike, overrides: list[str] | tuple = (),
                  reference: ReferencePlacement | None = None) -> tuple[Config, Transformer]:
    """The megamix config and model (fp32, on the host) of a Hugging Face directory."""
    hf_dir = Path(hf_dir)
    cfg = import_config(hf_dir, overrides, reference)
    schemes = layer_schemes(cfg.norm, cfg.model.num_layers)
    model = empty_model(cfg)  # every weight is overwritten below
    params = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for hf_name, tensor in hf_tensors(hf_dir):
            if _skipped(hf_name, reference):
                continue
            try:
                name = from_hf_name(hf_name, schemes)
            except KeyError:
                name = None
            if name not in params:
                hint = ""
                if reference is None and any(f".{n}." in hf_name for n in _POST_LN_NAMES):
                    hint = (" (a checkpoint of the Mix-LN reference code? give its placement: "
                            "--reference-norm-type NORM_TYPE [--reference-post-num POST_NUM])")
                raise HFImportError(f"{hf_dir}: {hf_name} has no place in the model being imported "
                                    f"(layers {describe_schemes(schemes)}){hint}")
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
    return cfg, model


@dataclass
class Verification:
    """The largest |logits difference| between megamix's model and transformers' on random tokens,
    and the largest |logit| (the scale it is judged against)."""

    max_diff: float
    max_logit: float
    tolerance: float = 1e-4  # relative to max(1, the largest |logit|): fp32 evaluation-order noise

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance * max(1.0, self.max_logit)

    def check(self, hf_dir: str | os.PathLike) -> None:
        if not self.ok:
            raise ImportVerificationError(
                f"{hf_dir}: the imported model's logits differ from transformers' by up to {self.max_diff:.3g} "
                f"(largest |logit| {self.max_logit:.3g}): the conversion is wrong; nothing was written")


@torch.no_grad()
def verify_import(hf_dir: str | os.PathLike, cfg: Config, model: Transformer,
                  reference: ReferencePlacement | None = None, seq_len: int = 32) -> Verification:
    """Compare ``model``'s logits with transformers' model of ``hf_dir`` in fp32: stock
    ``LlamaForCausalLM`` for a Pre-LN RMSNorm model, else ``modeling_megamix``'s (transformers'
    Llama with the norms placed per layer, the file megamix ships in exports), configured from the
    directory's ``config.json`` plus the placement (its own rows for a megamix export, the
    reference's values or ``--set`` flags otherwise), its weights loaded from the directory's files
    by their Hugging Face names.  Holds both models in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_dir = Path(hf_dir)
    fields = json.loads((hf_dir / "config.json").read_text())
    fields.pop("auto_map", None)
    pad = fields.get("pad_token_id")
    if isinstance(pad, int) and not 0 <= pad < cfg.model.vocab_size:
        fields.pop("pad_token_id")  # the reference's -1: a padding row only matters for training
    if is_stock_llama(cfg.model, cfg.norm) and fields.get("model_type") == "llama":
        config_class, model_class = LlamaConfig, LlamaForCausalLM
    else:
        from megamix.hf import modeling_megamix

        config_class, model_class = modeling_megamix.MegamixConfig, modeling_megamix.MegamixForCausalLM
        if fields.get("model_type") != "megamix":
            ours = hf_config(cfg.model, cfg.norm)
            fields.update({k: ours[k] for k in ("layer_schemes", "layer_norms", "norm_type") if k in ours})
        fields["model_type"] = "megamix"
    theirs = model_class(config_class.from_dict(fields)).float().eval()
    state = {name: tensor for name, tensor in hf_tensors(hf_dir) if not _skipped(name, reference)}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if theirs.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ImportVerificationError(f"{hf_dir}: transformers' model of it does not take its weights "
                                      f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    length = min(seq_len, cfg.model.max_seq_len, int(fields.get("max_position_embeddings", seq_len)))
    tokens = torch.randint(cfg.model.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    expected = theirs(tokens).logits
    got = model.eval()(tokens)
    return Verification(float((got - expected).abs().max()), float(expected.abs().max()))


def write_import(cfg: Config, model: Transformer, hf_dir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Save ``model`` as the run directory ``output`` (config, a step-0 checkpoint, the tokenizer)."""
    hf_dir, output = Path(hf_dir), Path(output)
    if (output / "checkpoints").exists():
        raise HFImportError(f"{output} already holds checkpoints; import into a new run directory")
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


def import_hf(hf_dir: str | os.PathLike, output: str | os.PathLike, overrides: list[str] | tuple = (),
              reference: ReferencePlacement | None = None, verify: bool = True) -> Path:
    """Convert ``hf_dir`` into the run directory ``output``; returns the checkpoint directory.
    With ``verify`` the model's logits are first checked against transformers' model of ``hf_dir``
    (:func:`verify_import`), and a mismatch is an error before anything is written."""
    hf_dir, output = Path(hf_dir), Path(output)
    if (output / "checkpoints").exists():
        raise HFImportError(f"{output} already holds checkpoints; import into a new run directory")
    cfg, model = read_hf_model(hf_dir, overrides, reference)
    if verify:
        verify_import(hf_dir, cfg, model, reference).check(hf_dir)
    return write_import(cfg, model, hf_dir, output)
