"""lm-evaluation-harness on exports, and megamix's own number for the same perplexity.

lm-eval's ``--model hf`` evaluates an export like any Hugging Face model.  Its perplexity of a
text (``loglikelihood_rolling``) is not the token-level perplexity ``megamix val-loss`` reports:

- each document is scored separately: its tokens (no special tokens added) are predicted once
  each, the first from a single prefix token (the tokenizer's BOS, else EOS), the rest in windows
  of ``max_length`` predictions, each window's input being the ``max_length`` positions that end
  just before its last target;
- the summed negative log-likelihood is divided by the documents' *words* (``word_perplexity``,
  ``len(re.split(r"\\s+", text))`` per document) or UTF-8 *bytes* (``byte_perplexity``,
  ``bits_per_byte``), not by tokens.

:func:`text_perplexity` computes exactly that with megamix's model and tokenizer (plus the
token-level perplexity), so the two can be compared number for number.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from megamix.checkpoint import load_model
from megamix.config import TEXT_TASK
from megamix.data.tokenizer import load_tokenizer
from megamix.errors import MegamixError
from megamix.hf.export import MODELING_FILE, export_checkpoint
from megamix.train.downstream import TASKS_DIR, text_task


class EvalError(MegamixError, ValueError):
    """A bad ``megamix lm-eval`` request."""


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a text file as the task reads them: JSON lines (``.gz`` too) with a
    ``text`` field, or a ``.txt`` file as one document."""
    path = Path(path)
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def prefix_token(export_dir: str | os.PathLike) -> int:
    """The token lm-eval conditions a document's first token on: the export tokenizer's BOS, else EOS."""
    from transformers import AutoTokenizer

    remote_code = "auto_map" in json.loads((Path(export_dir) / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True, trust_remote_code=remote_code)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise EvalError(f"{export_dir}: the tokenizer has neither BOS nor EOS to start a document with")
    return prefix


class RemoteCodeError(MegamixError, ValueError):
    """An export ships Python that megamix has not been told to trust."""


# SHA-256 of every earlier version of megamix's own modeling_megamix.py, so that exports written by
# earlier megamix versions stay trusted (tests/test_trust.py checks this list against git history:
# a change to the file must add the digest of the version it replaces).
EARLIER_MODELING_SHA256 = frozenset({
    "f54ff010597f34999661817ad7bf6ee63fefab9179c963ea149ecbc95f49a224",
    "90be90ac6bb892f5ada894e8ab8fcd1e2ac4762eff23975d8d10ea01422803dc",
    "6e19514589975fe40e3e4acb72271125219ec86ef8ee6508112e44a8184ccb6b",
})


def is_megamix_modeling_file(path: Path) -> bool:
    """Whether ``path`` is byte for byte this megamix's ``modeling_megamix.py`` or an earlier one's."""
    data = path.read_bytes()
    return data == MODELING_FILE.read_bytes() or hashlib.sha256(data).hexdigest() in EARLIER_MODELING_SHA256


def trust_remote_code(export_dir: str | os.PathLike, explicitly: bool = False) -> bool:
    """Whether loading the export runs its own Python, and whether that is allowed.

    A stock Llama export runs none.  An export with an ``auto_map`` runs its modeling file: allowed
    when the user says so (``--trust-remote-code``), or when the code is exactly megamix's own
    ``modeling_megamix.py`` (byte for byte, this version's or an earlier megamix's) and the config
    names nothing else.  Otherwise loading would execute a stranger's code, so it is refused with a
    named error.
    """
    export_dir = Path(export_dir)
    maps = {}
    for name in ("config.json", "tokenizer_config.json"):
        file = export_dir / name
        if file.is_file():
            maps[name] = json.loads(file.read_text()).get("auto_map") or {}
    if not any(maps.values()):
        return False
    if explicitly:
        return True
    theirs = export_dir / MODELING_FILE.name
    targets = {v for m in maps.values() for v in (m.values() if isinstance(m, dict) else [m])
               for v in (v if isinstance(v, list) else [v]) if v}
    only_ours = all(isinstance(t, str) and t.split(".")[0] == MODELING_FILE.stem for t in targets)
    if only_ours and not maps.get("tokenizer_config.json") and theirs.is_file() and is_megamix_modeling_file(theirs):
        return True
    raise RemoteCodeError(
        f"{export_dir} ships Python code (auto_map: {sorted(map(str, targets))}) that is not megamix's own "
        f"{MODELING_FILE.name}; loading it would run that code. Pass --trust-remote-code if you trust it.")


def run_lm_eval(
    export_dir: str | os.PathLike,
    tasks: list[str],
    text: str | os.PathLike | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_code: bool = False,
) -> dict:
    """``lm_eval --model hf`` on an export; returns lm-eval's per-task results.

    The text task's documents are encoded without special tokens and conditioned on
    :func:`prefix_token`, whatever the tokenizer's defaults, so :func:`text_perplexity` can
    reproduce the number.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    config = json.loads((Path(export_dir) / "config.json").read_text())
    task_specs: list = []
    for name in tasks:
        if name == TEXT_TASK:
            if text is None:
                raise EvalError(f"task {TEXT_TASK} needs a text file (--text)")
            task_specs.append(text_task(text))
        else:
            task_specs.append(name)
    model_args = {
        "pretrained": str(export_dir),
        "trust_remote_code": trust_remote_code(export_dir, trust_code),
        "dtype": dtype,
        "add_bos_token": False,
        "prefix_token_id": prefix_token(export_dir),
        "max_length": max_length or config["max_position_embeddings"],
    }
    # Indexing lm-eval's thousands of built-in tasks takes seconds; skip it when none is asked for.
    tasks_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=any(t != TEXT_TASK for t in tasks))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=task_specs, batch_size=batch_size, device=device, limit=limit,
        log_samples=False, task_manager=tasks_manager,
    )
    return results["results"]


@torch.no_grad()
def document_nll(model: torch.nn.Module, tokens: list[int], prefix: int, max_length: int) -> float:
    """Summed negative log-likelihood of ``tokens`` after ``prefix``, in lm-eval's rolling windows."""
    sequence = torch.tensor([prefix, *tokens])
    total = 0.0
    for first in range(0, len(tokens), max_length):
        last = min(first + max_length, len(tokens))  # this window predicts tokens[first:last]
        start = max(0, last - max_length)
        logits = model(sequence[None, start:last])[0, first - start:]
        total += F.cross_entropy(logits.double(), sequence[first + 1:last + 1], reduction="sum").item()
    return total


def text_perplexity(
    model: torch.nn.Module, tokenizer, documents: list[str], prefix: int, max_length: int
) -> dict:
    """megamix's evaluation of lm-eval's text task: word, byte and token perplexity, bits per byte."""
    model.eval()
    nll = tokens = words = num_bytes = 0
    for text in documents:
        ids = tokenizer.encode(text)
        nll += document_nll(model, ids, prefix, max_length)
        tokens += len(ids)
        words += len(re.split(r"\s+", text))
        num_bytes += len(text.encode("utf-8"))
    return {
        "word_perplexity": math.exp(nll / words),
        "byte_perplexity": math.exp(nll / num_bytes),
        "bits_per_byte": nll / num_bytes / math.log(2),
        "token_perplexity": math.exp(nll / tokens),
        "tokens": tokens,
        "words": words,
        "bytes": num_bytes,
    }


def evaluate(
    tasks: list[str],
    checkpoint: str | os.PathLike | None = None,
    export: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    compare: bool = False,
    **lm_eval_args,
) -> dict:
    """``megamix lm-eval``: lm-eval on an export (made on the fly, in fp32, from ``checkpoint`` when
    no ``export`` is given) and, with ``compare``, megamix's own number for the text task."""
    if export is None and (checkpoint is None or tokenizer is None):
        raise EvalError("give an export directory, or a checkpoint and its tokenizer")
    if compare and (checkpoint is None or text is None):
        raise EvalError("comparing with megamix needs the checkpoint and a text file")
    with tempfile.TemporaryDirectory(prefix="megamix-eval-") as scratch:
        if export is None:
            export = export_checkpoint(checkpoint, Path(scratch) / "export", tokenizer=tokenizer, dtype="fp32")
        config = json.loads((Path(export) / "config.json").read_text())
        lm_eval_args["max_length"] = lm_eval_args.get("max_length") or config["max_position_embeddings"]
        report = {"lm_eval": run_lm_eval(export, tasks, text=text, **lm_eval_args)}
        if compare:
            documents = read_documents(text)[:lm_eval_args.get("limit")]  # lm-eval's limit: the first N
            report["megamix"] = text_perplexity(
                load_model(checkpoint), load_tokenizer(tokenizer or export), documents, prefix_token(export),
                lm_eval_args["max_length"],
            )
    return report
