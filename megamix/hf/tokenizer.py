"""The tokenizer of an export: what ``AutoTokenizer.from_pretrained(export)`` loads, offline.

A megamix corpus was tokenized by :mod:`megamix.data.tokenizer` (SentencePiece ``.model`` or a
Hugging Face ``tokenizer.json``), with no special tokens in the text and EOS appended to every
document.  The export must encode text to exactly those ids, so the tokenizer saved here adds no
special tokens and is checked, id for id, against megamix's own tokenizer before it is written.

A SentencePiece model is rebuilt as a ``tokenizers`` pipeline here rather than through
transformers' converter: that converter orders BPE merges by vocabulary id, not by SentencePiece's
piece scores, and so splits runs of spaces differently from the model the corpus was made with.
Since documents are separated by EOS in training, EOS is also the exported tokenizer's BOS (as in
GPT-2): it is the token a document starts after, and the one lm-eval conditions a text on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from megamix.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from megamix.errors import MegamixError


class TokenizerMismatchError(MegamixError, ValueError):
    """A tokenizer that cannot be the model's, or that Hugging Face would encode differently."""

# Text on which the exported tokenizer must give megamix's ids: words, whitespace runs, digits,
# newlines, accents, CJK, emoji (byte fallback).
PROBES = (
    "In the beginning God created the heavens and the earth.",
    "Hello world",
    " leading space",
    "  two leading spaces, a  b   c    d",
    "trailing space ",
    "line one\nline two\n\n\tindented\r\n",
    "digits 1234567 and 3.14159, 2024-05-01",
    "Ünïcödé café naïve — “quotes” ‘single’",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂👍🏽 and symbols ∑∫√ ≤ ≥",
    "x" * 40 + " " * 17 + "y",
    "",
)

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED = 1, 2, 3, 4
_SP_UNIGRAM, _SP_BPE = 1, 2


@dataclass
class SpecialTokens:
    """Ids the export's ``config.json`` and ``generation_config.json`` need."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None


def save_tokenizer(
    source: str | os.PathLike, output: str | os.PathLike, model_max_length: int, vocab_size: int | None = None
) -> SpecialTokens:
    """Write a Hugging Face tokenizer for ``source`` (SentencePiece or HF) into ``output``;
    ``vocab_size`` is the model's, which must cover every id the tokenizer produces."""
    from transformers import PreTrainedTokenizerFast

    ours = load_tokenizer(source)
    if isinstance(ours, SentencePieceTokenizer):
        hf = PreTrainedTokenizerFast(
            tokenizer_object=sentencepiece_to_tokenizers(ours.files[0]), clean_up_tokenization_spaces=False
        )
        hf.unk_token = _sentencepiece_unk(ours.files[0])
        if ours.eos_id is not None:
            hf.eos_token = hf.bos_token = hf.convert_ids_to_tokens(ours.eos_id)
    elif isinstance(ours, HFTokenizer):
        hf = _load_hf(ours)
    else:
        raise TypeError(f"unsupported tokenizer {type(ours).__name__}")
    if vocab_size is not None and len(hf) > vocab_size:
        raise TokenizerMismatchError(
            f"{source} has {len(hf)} tokens but the model only {vocab_size}: not its tokenizer")
    hf.model_max_length = model_max_length
    check_same_ids(ours, hf)
    output = Path(output)
    hf.save_pretrained(output)
    _portable_class_name(output / "tokenizer_config.json")
    return SpecialTokens(hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)


def _load_hf(ours: HFTokenizer):
    """A ``tokenizer.json`` with its ``tokenizer_config.json`` when there is one; else the bare file
    with the EOS/BOS megamix found for it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = ours.files[0].parent
    if (directory / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(ours.files[0]), clean_up_tokenization_spaces=False)
    if ours.bos_id is not None:
        hf.bos_token = hf.convert_ids_to_tokens(ours.bos_id)
    if ours.eos_id is not None:
        hf.eos_token = hf.convert_ids_to_tokens(ours.eos_id)
    return hf


def check_same_ids(ours, hf, texts: tuple[str, ...] = PROBES) -> None:
    """Raise unless the HF tokenizer encodes text (special tokens aside) like megamix's tokenizer."""
    for text in texts:
        expected, got = ours.encode(text), hf.encode(text, add_special_tokens=False)
        if expected != got:
            raise TokenizerMismatchError(
                f"the exported tokenizer disagrees with {ours.name} on {text!r}: {got[:12]} vs {expected[:12]}; "
                "pass a Hugging Face tokenizer directory with --tokenizer instead"
            )


def _portable_class_name(config_file: Path) -> None:
    """transformers 5 writes its internal backend class name; every version reads this one."""
    fields = json.loads(config_file.read_text())
    if fields.get("tokenizer_class") == "TokenizersBackend":
        fields["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n")


def _sentencepiece_unk(model_file: Path) -> str | None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None


def sentencepiece_to_tokenizers(model_file: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` that segments like the SentencePiece model (BPE or unigram).

    BPE merges are ranked by the score of the merged piece (higher first), which is the order
    SentencePiece applies them in.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if trainer.model_type == _SP_BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        ranked = []
        for i, (piece, score, kind) in enumerate(pieces):
            if kind != _SP_NORMAL:
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    ranked.append((-score, i, cut, left, right))
        merges = [(left, right) for *_, left, right in sorted(ranked)]
        model = BPE(vocab=vocab, merges=merges, unk_token=trainer.unk_piece, fuse_unk=True,
                    byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _SP_UNIGRAM:
        model = Unigram([(piece, score) for piece, score, _ in pieces], unk_id=trainer.unk_id,
                        byte_fallback=trainer.byte_fallback)
    else:
        raise TokenizerMismatchError(
            f"{model_file}: SentencePiece model type {trainer.model_type} (only BPE and unigram)")
    tokenizer = Tokenizer(model)
    steps = []
    if normalizer.precompiled_charsmap:
        steps.append(normalizers.Precompiled(normalizer.precompiled_charsmap))
    if normalizer.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if normalizer.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        decode += [decoders.ByteFallback(), decoders.Fuse()]
    if normalizer.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    tokenizer.add_special_tokens([
        AddedToken(piece, special=kind != _SP_USER_DEFINED, normalized=False)
        for piece, _, kind in pieces if kind in (_SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED)
    ])
    return tokenizer
