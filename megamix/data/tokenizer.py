"""Load a tokenizer from a path: a SentencePiece ``.model`` or a Hugging Face tokenizer.

Both kinds expose the same small interface (:class:`Tokenizer`), so the preprocessing tool, the
trainer and the exporter never branch on the kind.  Encoding adds no special tokens: a document's
ids are the text's ids, and callers that want an end-of-document marker append ``eos_id``
themselves (Megatron's ``--append-eod``).

Deliberately free of torch and transformers: importing this module costs milliseconds, which
matters for tools that spawn worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from megamix.errors import MegamixError


class TokenizerError(MegamixError, ValueError):
    """A tokenizer file that is not a usable tokenizer."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """A tokenizer path where there is no tokenizer."""

# Names under which Hugging Face tokenizers commonly spell their end-of-text token, tried in this
# order when no tokenizer_config.json / special_tokens_map.json says which one it is.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    files: tuple[Path, ...]

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece model file.  ``threads`` is SentencePiece's ``num_threads`` per batch."""

    def __init__(self, model_file: str | os.PathLike, threads: int | None = None):
        import sentencepiece

        self.files = (Path(model_file),)
        self.name = str(model_file)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.threads = threads
        self.vocab_size = self._sp.vocab_size()
        self.eos_id = _valid_id(self._sp.eos_id())
        self.bos_id = _valid_id(self._sp.bos_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.threads is None:
            return self._sp.encode(list(texts))
        return self._sp.encode(list(texts), num_threads=self.threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``, loaded with the ``tokenizers`` library (no transformers).

    The end-of-text token comes from ``tokenizer_config.json`` or ``special_tokens_map.json`` next
    to the file when present, else from the usual names (``</s>``, ``<|endoftext|>``, ...).
    Batches use the library's own thread pool; set ``TOKENIZERS_PARALLELISM=false`` to keep a
    process on one core.
    """

    def __init__(self, tokenizer_json: str | os.PathLike):
        from tokenizers import Tokenizer as _HF

        path = Path(tokenizer_json)
        self.name = str(path)
        self._tok = _HF.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_files = [p for p in (path.with_name("tokenizer_config.json"),
                                    path.with_name("special_tokens_map.json")) if p.is_file()]
        self.files = (path, *config_files)
        self.eos_id = self._special_id("eos_token", config_files, _EOS_CANDIDATES)
        self.bos_id = self._special_id("bos_token", config_files, ("<s>", "<|begin_of_text|>", "<bos>"))
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def _special_id(self, key: str, config_files: list[Path], fallbacks: Sequence[str]) -> int | None:
        for config in config_files:
            token = json.loads(config.read_text(encoding="utf-8")).get(key)
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and self._tok.token_to_id(token) is not None:
                return self._tok.token_to_id(token)
        for token in fallbacks:
            if self._tok.token_to_id(token) is not None:
                return self._tok.token_to_id(token)
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | os.PathLike, threads: int | None = None) -> Tokenizer:
    """A SentencePiece ``.model`` file, a ``tokenizer.json``, or a directory holding either.

    A directory with a ``tokenizer.json`` is a Hugging Face tokenizer; one with only a
    ``tokenizer.model`` is SentencePiece.  Any other file is tried as a SentencePiece model.
    ``threads`` bounds SentencePiece's threads per batch (None: its default).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path / "tokenizer.json")
        models = sorted(path.glob("*.model"))
        if (path / "tokenizer.model").is_file():
            models = [path / "tokenizer.model"]
        if len(models) != 1:
            raise TokenizerNotFoundError(
                f"{path}: expected a tokenizer.json (Hugging Face) or one *.model (SentencePiece), "
                f"found {len(models)} .model files and no tokenizer.json"
            )
        return SentencePieceTokenizer(models[0], threads)
    if not path.is_file():
        raise TokenizerNotFoundError(f"{path}: no such tokenizer file or directory")
    if path.suffix == ".json":
        return HFTokenizer(path)
    try:
        return SentencePieceTokenizer(path, threads)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{path}: not a SentencePiece model or tokenizer.json ({e})") from e


def fingerprint(tokenizer: Tokenizer) -> str:
    """SHA-256 over the files that define the tokenizer: equal fingerprints, equal ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    for f in tokenizer.files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _valid_id(i: int) -> int | None:
    return i if i >= 0 else None
