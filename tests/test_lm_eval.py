"""lm-evaluation-harness on an export, offline: its ``--model hf`` perplexity of a local text must
be megamix's own evaluation of the same text, and the exported tokenizer must be the corpus'."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import sentencepiece  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import TINY, write_corpus  # noqa: E402

from megamix import load_model  # noqa: E402
from megamix.cli import main  # noqa: E402
from megamix.config import load_config  # noqa: E402
from megamix.data.tokenizer import load_tokenizer  # noqa: E402
from megamix.hf.harness import TASKS_DIR, TEXT_TASK, read_documents, text_perplexity  # noqa: E402
from megamix.hf.tokenizer import save_tokenizer  # noqa: E402
from megamix.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_demo_corpus import documents, mistral_tokenizer_path  # noqa: E402


@pytest.fixture(scope="module")
def bible():
    return [doc["text"] for doc in documents(120)[:40]]


@pytest.fixture(scope="module")
def model_32k(tmp_path_factory):
    """A tiny Mix-LN model over the demo's 32k SentencePiece vocabulary, trained a few steps."""
    root = tmp_path_factory.mktemp("lm_eval")
    write_corpus(root / "corpus", vocab=32000)
    Trainer(load_config(None, TINY + [
        "model.vocab_size=32000", "norm.scheme=mix", "norm.alpha=0.5", "train.steps=3", "train.eval_interval=0",
        f"data.path={root / 'corpus'}", f"train.output_dir={root / 'run'}",
    ]), device="cpu").run()
    return root / "run"


def test_exported_sentencepiece_tokenizer_loads_offline_and_gives_the_corpus_ids(tmp_path, bible):
    transformers = pytest.importorskip("transformers")
    model_file = mistral_tokenizer_path()
    special = save_tokenizer(model_file, tmp_path / "tok", model_max_length=256, vocab_size=32000)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    texts = bible + ["  two spaces", "tabs\tand\nnewlines\n\n", "x" + " " * 9 + "y", "naïve 日本 🙂"]
    for text in texts:
        assert hf(text)["input_ids"] == sp.encode(text), text  # as preprocess_c4.py tokenized: no BOS
        assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert special.eos_id == hf.eos_token_id == sp.eos_id() and hf.bos_token_id == sp.eos_id()


def test_text_perplexity_is_the_full_context_loss_when_documents_fit_in_a_window(model_32k, bible):
    """The windowed evaluation reduces to plain next-token loss after the prefix token."""
    model, tokenizer = load_model(model_32k), load_tokenizer(mistral_tokenizer_path())
    docs = [d for d in bible if len(tokenizer.encode(d)) < 60][:5]
    result = text_perplexity(model, tokenizer, docs, prefix=2, max_length=64)
    nll = tokens = 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([[2, *tokenizer.encode(doc)]])
            nll += F.cross_entropy(model(ids[:, :-1])[0].double(), ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    assert result["tokens"] == tokens
    assert result["token_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / sum(len(d.split()) for d in docs)), rel=1e-6)


def test_lm_eval_perplexity_of_an_export_agrees_with_megamix(model_32k, bible, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    text = tmp_path / "valid.jsonl"
    long_document = " ".join(bible[:4])  # several 16-token windows
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in [long_document, *bible[4:10]]))
    assert main(["lm-eval", "--checkpoint", str(model_32k), "--tokenizer", str(mistral_tokenizer_path()),
                 "--tasks", TEXT_TASK, "--text", str(text), "--max-length", "16", "--batch-size", "8",
                 "--compare", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    lm_eval, ours = report["lm_eval"][TEXT_TASK], report["megamix"]
    assert ours["tokens"] > 16 * 20 and ours["words"] == sum(len(t.split()) for t in read_documents(text))
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert lm_eval[f"{metric},none"] == pytest.approx(ours[metric], rel=1e-5), metric


def test_task_yaml_is_a_valid_lm_eval_task():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    assert TEXT_TASK in TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks
