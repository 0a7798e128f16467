"""A megamix checkpoint (any parallel layout) → a Hugging Face model directory, one layer at a time.

The export holds ``config.json``, ``generation_config.json``, safetensors weights (sharded with an
index above ``max_shard_size``) and, given one, the tokenizer.  A model whose layers are all
Pre-LN with RMSNorm is exported as stock ``LlamaForCausalLM``; any other placement ships
``modeling_megamix.py`` beside the weights (``trust_remote_code=True``) and its own
``model_type``, so transformers cannot silently load it as a plain Llama.  ``config.json``'s
``"reference"`` gives the ``NORM_TYPE``/``POST_NUM`` under which the papers' reference code computes
the same model from these weights (``megamix.hf.reference``), or is null with a
``"reference_note"`` saying why none does.

Memory: DCP reads only the tensors asked for, so the exporter asks for one module at a time (the
embedding, one block, the final norm, the head) and writes each tensor straight to its place in a
safetensors file whose header was computed up front from the checkpoint's metadata.  Peak memory
is about twice the largest module (DCP's read buffer and the tensor), whatever the model's depth:
+0.25 GB for a 1.4 GB, 24-layer checkpoint, where loading the whole model takes +1.5 GB.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from megamix.checkpoint import load_model
from megamix.checkpoint.weights import WeightReader
from megamix.config import Config
from megamix.errors import MegamixError
from megamix.hf.adapter import hf_config, is_stock_llama, to_hf_name
from megamix.hf.reference import reference_fields
from megamix.hf.tokenizer import SpecialTokens, save_tokenizer
from megamix.schemes import layer_schemes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' "5GB"
MODELING_FILE = Path(__file__).with_name("modeling_megamix.py")
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_AUTO_MAP = {
    "AutoConfig": "modeling_megamix.MegamixConfig",
    "AutoModel": "modeling_megamix.MegamixModel",
    "AutoModelForCausalLM": "modeling_megamix.MegamixForCausalLM",
}


class SafetensorsWriter:
    """Writes safetensors shards tensor by tensor.

    Every tensor's name, dtype and shape is known before the first byte is written, so each
    shard's header (and byte offsets) is final from the start and tensors are appended as they
    arrive, in the order given; nothing is ever held for a whole shard.
    """

    def __init__(self, directory: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_size: int):
        self.directory, self.dtype = directory, dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        shard_bytes = 0
        for name, shape in entries:
            nbytes = itemsize * int(torch.Size(shape).numel())
            if self.shards[-1] and shard_bytes + nbytes > max_shard_size:
                self.shards.append([])
                shard_bytes = 0
            self.shards[-1].append((name, tuple(shape), nbytes))
            shard_bytes += nbytes
        self.total_size = sum(n for shard in self.shards for _, _, n in shard)
        self.pending: Iterator[tuple[int, str, tuple[int, ...], int]] = (
            (i, name, shape, nbytes) for i, shard in enumerate(self.shards) for name, shape, nbytes in shard
        )
        self.file_index = -1

    def file_name(self, index: int) -> str:
        if len(self.shards) == 1:
            return "model.safetensors"
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def _start(self, index: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, nbytes in self.shards[index]:
            header[name] = {"dtype": _SAFETENSORS_DTYPES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        (self.directory / self.file_name(index)).write_bytes(len(encoded).to_bytes(8, "little") + encoded)
        self.file_index = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, expected, shape, nbytes = next(self.pending)
        if name != expected or tuple(tensor.shape) != shape:
            raise RuntimeError(f"safetensors writer expected {expected} {shape}, got {name} {tuple(tensor.shape)}")
        if index != self.file_index:
            self._start(index)
        data = tensor.to(self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == nbytes
        with open(self.directory / self.file_name(index), "ab") as f:
            f.write(data)

    def close(self) -> None:
        """Check every tensor arrived and, for several shards, write the index transformers reads."""
        if next(self.pending, None) is not None:
            raise RuntimeError("safetensors writer closed before every tensor was written")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: self.file_name(i) for i, shard in enumerate(self.shards) for name, _, _ in shard},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class ExportError(MegamixError, ValueError):
    """An export cannot be written where asked (the target holds something an export must not replace)."""


class ExportExistsError(ExportError, FileExistsError):
    """The target exists and ``overwrite`` was not given."""


# What an export directory holds: ours, and what ``save_pretrained`` writes for a tokenizer.
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                MODELING_FILE.name, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt"}
_SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _is_run_or_checkpoint(path: Path) -> bool:
    return (path / "train_state.json").exists() or (path / "checkpoints").is_dir() or (
        (path / "config.yaml").is_file() and (path / "metrics.jsonl").exists())


def check_replaceable(output: Path) -> None:
    """Refuse to replace anything but a previous export: a run or checkpoint directory, a directory
    inside one, or one holding files (or directories) an export does not write."""
    for place in (output, *output.parents):
        if _is_run_or_checkpoint(place):
            where = "is" if place == output else "lies inside"
            raise ExportError(f"{output} {where} a megamix run or checkpoint directory ({place}); "
                              "--overwrite only replaces a previous export")
    foreign = sorted(child.name for child in output.iterdir()
                     if not (child.is_file() and (child.name in EXPORT_FILES or _SHARD_FILE.match(child.name))))
    if foreign or not (output / "config.json").is_file():
        listed = "it holds " + ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "") if foreign else ""
        raise ExportError(f"{output} is not a previous export ({listed or 'no config.json'}); "
                          "--overwrite only replaces a previous export, so nothing was deleted")


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "bf16",
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Export ``checkpoint`` (a checkpoint or run directory, latest checkpoint) into ``output``.

    The directory is assembled under a temporary name and renamed when complete, so ``output``
    is never a half-written export.  ``overwrite`` replaces a previous export only (see
    :func:`check_replaceable`); the old one is deleted once the new one is in place.
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    output = Path(output).absolute()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise ExportExistsError(f"{output} exists and is not empty (--overwrite replaces a previous export)")
        if not output.is_dir():
            raise ExportError(f"{output} is a file, not a previous export")
        check_replaceable(output)
    reader = WeightReader(checkpoint)
    cfg = reader.cfg
    schemes = layer_schemes(cfg.norm, cfg.model.num_layers)
    tmp = output.with_name(f".{output.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        special = SpecialTokens(None, None, None)
        if tokenizer is not None:  # first: a wrong tokenizer fails in seconds, not after the weights
            special = save_tokenizer(tokenizer, tmp, cfg.model.max_seq_len, cfg.model.vocab_size)
        entries = [(to_hf_name(name, schemes), shape) for name, shape in reader.entries]
        writer = SafetensorsWriter(tmp, entries, DTYPES[dtype], max_shard_size)
        for module in reader.modules():
            for name, tensor in module.items():
                writer.write(to_hf_name(name, schemes), tensor)
        writer.close()
        write_configs(tmp, cfg, DTYPES[dtype], special)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = output.with_name(f".{output.name}.old")
    if output.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)
    return output


def write_configs(directory: Path, cfg: Config, dtype: torch.dtype, special: SpecialTokens) -> None:
    """``config.json`` and ``generation_config.json``; the modeling file where the model needs it."""
    fields = hf_config(cfg.model, cfg.norm)
    tokens = {"bos_token_id": special.bos_id, "eos_token_id": special.eos_id, "pad_token_id": special.pad_id}
    tokens = {k: v for k, v in tokens.items() if v is not None}
    fields.update(tokens, dtype=str(dtype).removeprefix("torch."), use_cache=True)
    fields.update(reference_fields(cfg.model, cfg.norm))  # the reference code's NORM_TYPE/POST_NUM for it
    if not is_stock_llama(cfg.model, cfg.norm):
        fields["auto_map"] = _AUTO_MAP
        shutil.copyfile(MODELING_FILE, directory / MODELING_FILE.name)
    (directory / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(tokens, indent=2) + "\n")


@torch.no_grad()
def verify_export(checkpoint: str | os.PathLike, export_dir: str | os.PathLike, seq_len: int = 32) -> float:
    """Max |logits difference| on random tokens between transformers' model of the export and
    megamix's model of the checkpoint with its weights rounded to the export's dtype (so a bf16
    export is held to fp32 accuracy too).  Holds both models in memory."""
    from transformers import AutoModelForCausalLM

    export_dir = Path(export_dir)
    config = json.loads((export_dir / "config.json").read_text())
    ours = load_model(checkpoint)
    export_dtype = getattr(torch, config["dtype"])
    for p in ours.parameters():
        p.copy_(p.to(export_dtype))
    theirs = AutoModelForCausalLM.from_pretrained(
        export_dir, dtype=torch.float32, trust_remote_code="auto_map" in config, local_files_only=True
    ).eval()
    shape = (2, min(seq_len, config["max_position_embeddings"]))
    tokens = torch.randint(config["vocab_size"], shape, generator=torch.Generator().manual_seed(0))
    return (ours(tokens) - theirs(tokens).logits).abs().max().item()
