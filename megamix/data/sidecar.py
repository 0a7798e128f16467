"""``PREFIX.json``: what a preprocessed corpus says about itself, written beside ``PREFIX.bin/.idx``.

``tools/preprocess_c4.py`` writes it when it finishes a corpus; ``megamix train`` reads it to refuse
a corpus that cannot belong to the model before any step runs: a token id at or beyond
``model.vocab_size`` (a larger vocabulary) or a tokenizer other than the one the config names
(``data.tokenizer``).  Corpora written by Megatron's own tool have no sidecar and still load; they
are then checked batch by batch as they are read.

Fields (JSON object, ``"format": "megamix-corpus"``, ``"version": 1``):

- ``tokenizer``: ``{"name", "fingerprint", "vocab_size", "eos_id"}`` (the fingerprint is
  :func:`megamix.data.tokenizer.fingerprint`: SHA-256 over the files that define the tokenizer);
- ``documents``, ``tokens``: counts, equal to the ``.idx``'s;
- ``max_id``: the largest token id in ``.bin``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megamix.errors import MegamixError

FORMAT = "megamix-corpus"
VERSION = 1


class SidecarError(MegamixError, ValueError):
    """A ``PREFIX.json`` is unreadable, or disagrees with its corpus or with the model."""


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(str(prefix) + ".json")


def write_sidecar(prefix: str | os.PathLike, *, tokenizer_name: str, tokenizer_fingerprint: str,
                  vocab_size: int, eos_id: int | None, documents: int, tokens: int, max_id: int) -> Path:
    """Write ``PREFIX.json`` atomically (temporary name, then rename)."""
    path = sidecar_path(prefix)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": {"name": tokenizer_name, "fingerprint": tokenizer_fingerprint, "vocab_size": vocab_size,
                      "eos_id": eos_id},
        "documents": int(documents),
        "tokens": int(tokens),
        "max_id": int(max_id),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_sidecar(prefix: str | os.PathLike) -> dict | None:
    """The corpus's ``PREFIX.json``, or None when it has none (a corpus from Megatron's tool)."""
    path = sidecar_path(prefix)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SidecarError(f"{path}: unreadable corpus description ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SidecarError(f"{path}: not a megamix corpus description (no \"format\": \"{FORMAT}\")")
    if record.get("version") != VERSION:
        raise SidecarError(f"{path}: corpus description version {record.get('version')!r}, expected {VERSION}")
    for key in ("documents", "tokens", "max_id"):
        if not isinstance(record.get(key), int):
            raise SidecarError(f"{path}: field {key!r} missing or not an integer")
    if not isinstance(record.get("tokenizer"), dict) or not isinstance(record["tokenizer"].get("fingerprint"), str):
        raise SidecarError(f"{path}: field 'tokenizer' missing its fingerprint")
    return record
