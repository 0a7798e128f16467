"""tools/preprocess_c4.py and megamix.data.tokenizer, checked against independent references.

The references: the tokenizers themselves (``sentencepiece``, ``tokenizers``) for the ids, and
Megatron-Core's ``IndexedDataset`` (the PyPI package) for the file format.  The tool always runs
as a subprocess, the way users run it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "preprocess_c4.py"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from make_demo_corpus import documents  # noqa: E402

from megamix.data.indexed import IndexedDataset  # noqa: E402
from megamix.data.sidecar import read_sidecar  # noqa: E402
from megamix.data.tokenizer import (  # noqa: E402
    HFTokenizer,
    SentencePieceTokenizer,
    fingerprint,
    load_tokenizer,
)

DOCS_PER_SHARD = 300  # ~600 KB of text: several 256 KiB blocks per shard, so workers split shards


# --------------------------------------------------------------------------------------------
# Fixtures: real text, the two tokenizer kinds, Megatron's reader


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real English documents (the demo corpus text), plus ones that stress the tokenizer."""
    base = [d["text"] for d in documents(400)]
    extra = ["Grüße aus Köln — naïve café, 東京, emoji 🚀🙂.", "tabs\tand\nnewlines\n\n inside", " x"]
    return extra + base


@pytest.fixture(scope="module")
def sp_model() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def sp(sp_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, texts) -> Path:
    """A small byte-level BPE trained on the text; its EOS (``<eod>``) named in tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<|endoftext|>", "<eod>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts[:300], trainer)
    directory = tmp_path_factory.mktemp("hf")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<eod>"}}))
    return directory


@pytest.fixture(scope="module")
def megatron_dataset():
    """Megatron-Core's reader (imports torch: seconds, so once per module)."""
    module = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    return module.IndexedDataset


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    lines = "".join(json.dumps({key: t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x.invalid/{i}"})
                    + "\n" for i, t in enumerate(texts))
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def c4_shards(directory: Path, texts: list[str], shards: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    per = len(texts) // shards
    return [str(write_jsonl(directory / f"c4-train.{k:05d}-of-{shards:05d}.json.gz", texts[k * per:(k + 1) * per]))
            for k in range(shards)]


def run_tool(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"tool failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def error_line(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The tool failed with ``code`` and said why in one ``preprocess_c4: ...`` line, no traceback."""
    assert proc.returncode == code, f"exit code {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("preprocess_c4: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def summary_count(stdout: str, label: str) -> int:
    match = re.search(rf"^{label}\s+([\d,]+)", stdout, re.MULTILINE)
    assert match, f"no {label!r} in summary:\n{stdout}"
    return int(match.group(1).replace(",", ""))


def read_bytes(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def assert_documents(megatron_dataset, prefix: Path, expected: list[list[int]], dtype=np.uint16) -> None:
    """Megatron-Core reads exactly ``expected``, one sequence per document."""
    ds = megatron_dataset(str(prefix))
    assert ds.index.dtype == dtype
    assert len(ds) == len(expected)
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(expected) + 1))
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids, f"document {i} differs"


# --------------------------------------------------------------------------------------------
# The C4 path: SentencePiece, json.gz shards, 1 and 2 workers


@pytest.fixture(scope="module")
def c4_run(tmp_path_factory, texts):
    """Three C4 shards tokenized with one worker: (inputs, texts, output prefix)."""
    tmp = tmp_path_factory.mktemp("c4")
    chosen = texts[: 3 * DOCS_PER_SHARD]
    inputs = c4_shards(tmp / "c4", chosen, 3)
    return inputs, chosen, tmp


def test_c4_shards_read_by_megatron_equal_sentencepiece_ids_plus_eos(c4_run, sp, sp_model, megatron_dataset):
    _, chosen, tmp = c4_run
    proc = run_tool("--input", str(tmp / "c4" / "c4-train.*.json.gz"), "--output-prefix", tmp / "w1",
                    "--tokenizer", sp_model, "--workers", 1)
    assert_documents(megatron_dataset, tmp / "w1", [sp.encode(t) + [sp.eos_id()] for t in chosen])
    assert summary_count(proc.stdout, "documents") == len(chosen)
    assert not (tmp / "w1.shards").exists(), "the work dir is removed after a successful merge"


def one_process_run(c4_run, sp_model) -> Path:
    """The first test's output (made again when that test was not selected)."""
    inputs, _, tmp = c4_run
    if not Path(f"{tmp / 'w1'}.json").exists():
        run_tool("--input", *inputs, "--output-prefix", tmp / "w1", "--tokenizer", sp_model, "--workers", 1)
    return tmp / "w1"


def test_two_workers_write_the_same_bytes_as_one(c4_run, sp_model):
    inputs, _, tmp = c4_run
    w1 = one_process_run(c4_run, sp_model)
    run_tool("--input", *inputs, "--output-prefix", tmp / "w2", "--tokenizer", sp_model, "--workers", 2)
    assert read_bytes(tmp / "w2") == read_bytes(w1)
    assert Path(f"{tmp / 'w2'}.json").read_bytes() == Path(f"{w1}.json").read_bytes()


def test_sidecar_describes_the_corpus(c4_run, sp_model):
    """PREFIX.json: the .idx's counts, the .bin's largest id, the tokenizer's fingerprint."""
    prefix = one_process_run(c4_run, sp_model)
    sidecar = read_sidecar(prefix)
    ds = IndexedDataset(prefix)
    ids = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    assert sidecar["documents"] == len(ds) == len(c4_run[1])
    assert sidecar["tokens"] == int(np.sum(ds.sequence_lengths)) == ids.size
    assert sidecar["max_id"] == int(ids.max())
    tok = load_tokenizer(sp_model)
    assert sidecar["tokenizer"] == {"name": str(sp_model), "fingerprint": fingerprint(tok), "vocab_size": 32000,
                                    "eos_id": 2}


def test_shard_slices_then_merge_only_equal_one_process(c4_run, sp_model):
    """The job-array split (slurm/preprocess.sh): slices tokenize, --merge-only merges, same bytes."""
    inputs, _, tmp = c4_run
    reference = one_process_run(c4_run, sp_model)
    args = ["--input", str(tmp / "c4" / "c4-train.*.json.gz"), "--output-prefix", tmp / "split",
            "--tokenizer", sp_model, "--workers", 1]
    proc = run_tool(*args, "--shard-slice", "0/2")  # inputs 0 and 2 of 3
    assert re.search(r"^inputs\s+2 of 3", proc.stdout, re.MULTILINE), proc.stdout
    assert not Path(f"{tmp / 'split'}.bin").exists()
    line = error_line(run_tool(*args, "--merge-only", check=False))  # slice 1 has not run
    assert "1 of 3 inputs have no finished shard" in line and f"{inputs[1]} (missing)" in line, line
    run_tool(*args, "--shard-slice", "1/2")
    run_tool(*args, "--merge-only")
    for suffix in (".bin", ".idx", ".json"):
        assert Path(f"{tmp / 'split'}{suffix}").read_bytes() == Path(f"{reference}{suffix}").read_bytes(), suffix
    assert not Path(f"{tmp / 'split'}.shards").exists()


def test_no_append_eod_and_max_docs(c4_run, sp, sp_model, megatron_dataset):
    inputs, chosen, tmp = c4_run
    n = DOCS_PER_SHARD + 50  # ends inside the second shard
    run_tool("--input", *inputs, "--output-prefix", tmp / "head", "--tokenizer", sp_model,
             "--no-append-eod", "--max-docs", n, "--workers", 2)
    assert_documents(megatron_dataset, tmp / "head", [sp.encode(t) for t in chosen[:n]])


# --------------------------------------------------------------------------------------------
# Other inputs and the Hugging Face tokenizer


def test_hf_tokenizer_on_jsonl_and_txt_inputs(tmp_path, texts, hf_dir, megatron_dataset):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    eos = reference.token_to_id("<eod>")
    jsonl_texts = texts[:40]
    write_jsonl(tmp_path / "a.jsonl", jsonl_texts, key="content")
    # Text: blocks separated by blank lines (one holding spaces); lines inside a block are kept.
    txt_docs = [t.replace("\n\n", "\n").strip() for t in texts[40:70]]
    (tmp_path / "b.txt").write_text("\n\n".join(txt_docs[:10]) + "\n  \n" + "\n\n\n".join(txt_docs[10:]) + "\n")
    for tokenizer in (hf_dir, hf_dir / "tokenizer.json"):
        prefix = tmp_path / f"out-{Path(tokenizer).name}"
        run_tool("--input", tmp_path / "a.jsonl", tmp_path / "b.txt", "--json-key", "content",
                 "--output-prefix", prefix, "--tokenizer", tokenizer, "--workers", 2)
        expected = [reference.encode(t, add_special_tokens=False).ids + [eos] for t in jsonl_texts + txt_docs]
        assert_documents(megatron_dataset, prefix, expected)


def test_vocabularies_of_65500_or_more_are_written_as_int32(tmp_path, megatron_dataset):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 70000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    write_jsonl(tmp_path / "d.jsonl", ["w5 w69999 w2", "nope w65536"])
    run_tool("--input", tmp_path / "d.jsonl", "--output-prefix", tmp_path / "out",
             "--tokenizer", tmp_path / "tokenizer.json", "--workers", 1)
    assert_documents(megatron_dataset, tmp_path / "out", [[5, 69999, 2, 1], [0, 65536, 1]], dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Resuming


def test_killed_run_resumes_to_the_same_bytes(tmp_path, texts, sp_model):
    inputs = c4_shards(tmp_path / "c4", texts[: 6 * 150], 6)
    args = ["--input", str(tmp_path / "c4" / "*.json.gz"), "--tokenizer", str(sp_model)]
    run_tool(*args, "--output-prefix", tmp_path / "clean", "--workers", 2)

    prefix = tmp_path / "crash"
    work = Path(f"{prefix}.shards")
    proc = subprocess.Popen([sys.executable, str(TOOL), *args, "--output-prefix", str(prefix), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(work.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the tool and any worker it started
        proc.wait()
    finished = len(list(work.glob("*.json")))
    assert 1 <= finished < len(inputs), "the kill should land after the first shard and before the last"
    assert not Path(f"{prefix}.bin").exists() and not Path(f"{prefix}.idx").exists()

    proc = run_tool(*args, "--output-prefix", prefix, "--workers", 2)
    assert re.search(rf"\({finished} reused", proc.stdout), proc.stdout
    assert read_bytes(prefix) == read_bytes(tmp_path / "clean")


def test_changed_input_is_tokenized_again(tmp_path, texts, sp, sp_model, megatron_dataset):
    inputs = c4_shards(tmp_path / "c4", texts[:60], 3)
    args = ["--input", *inputs, "--output-prefix", tmp_path / "out", "--tokenizer", sp_model, "--keep-shards"]
    run_tool(*args, "--workers", 1)
    new_middle = texts[100:120]
    write_jsonl(Path(inputs[1]), new_middle)
    proc = run_tool(*args, "--workers", 1)
    assert "(2 reused" in proc.stdout
    expected = texts[:20] + new_middle + texts[40:60]
    assert_documents(megatron_dataset, tmp_path / "out", [sp.encode(t) + [sp.eos_id()] for t in expected])


# --------------------------------------------------------------------------------------------
# Bad input


def test_malformed_line_stops_the_run_with_file_and_line(tmp_path, texts, sp_model):
    good = write_jsonl(tmp_path / "a.jsonl", texts[:5])
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n\n" + '{"text": "cut off\n' + json.dumps({"text": "x"}) + "\n")
    proc = run_tool("--input", good, bad, "--output-prefix", tmp_path / "out", "--tokenizer", sp_model,
                    "--workers", 2, check=False)
    assert error_line(proc).startswith(f"preprocess_c4: {bad}:3: invalid JSON")
    assert not list(tmp_path.glob("out.bin*")) and not list(tmp_path.glob("out.idx*"))
    work = tmp_path / "out.shards"
    # The good input is finished and kept for a re-run; nothing of the bad one looks finished.
    assert len(list(work.glob("a.jsonl-*.json"))) == 1
    assert [p.name for p in work.iterdir() if p.name.startswith("b.jsonl")] == []


def test_skip_malformed_counts_and_skips_bad_lines(tmp_path, sp, sp_model, megatron_dataset):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([
        json.dumps({"text": "first good line"}),
        '{"text": broken}',
        "[1, 2, 3]",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": "last good line"}),
    ]) + "\n")
    proc = run_tool("--input", path, "--output-prefix", tmp_path / "out", "--tokenizer", sp_model,
                    "--skip-malformed", "--workers", 1)
    assert summary_count(proc.stdout, "malformed lines") == 4
    for line in (2, 3, 4, 5):
        assert f"{path}:{line}:" in proc.stdout
    expected = [sp.encode(t) + [sp.eos_id()] for t in ("first good line", "last good line")]
    assert_documents(megatron_dataset, tmp_path / "out", expected)


def test_bad_bytes_empty_and_huge_documents_are_counted_not_fatal(tmp_path, sp, sp_model, megatron_dataset):
    huge = "All work and no play makes a dull document. " * 24_000  # over 1 MiB
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"\n".join([
        b'{"text": "caf\xe9 au lait \xff\xfe"}',  # Latin-1 bytes: not UTF-8
        b'{"text": "lone \\ud800 surrogate, fine pair \\ud83d\\ude80"}',
        b'{"text": ""}',
        json.dumps({"text": huge}).encode(),
        b'{"text": "normal"}',
    ]) + b"\n")
    proc = run_tool("--input", path, "--output-prefix", tmp_path / "out", "--tokenizer", sp_model, "--workers", 2)
    assert summary_count(proc.stdout, "non-UTF-8 documents") == 2
    assert summary_count(proc.stdout, "empty documents") == 1
    assert summary_count(proc.stdout, "huge documents") == 1
    texts = ["caf\ufffd au lait \ufffd\ufffd", "lone \ufffd surrogate, fine pair \U0001f680", huge, "normal"]
    assert_documents(megatron_dataset, tmp_path / "out", [sp.encode(t) + [sp.eos_id()] for t in texts])


@pytest.mark.parametrize("case", ["empty files", "all malformed", "only empty documents"])
def test_no_documents_is_an_error_and_writes_no_corpus(tmp_path, sp_model, case):
    if case == "empty files":
        inputs = [tmp_path / "a.jsonl", tmp_path / "b.txt"]
        inputs[0].write_text("")
        inputs[1].write_text("\n  \n\n")
    elif case == "all malformed":
        inputs = [tmp_path / "bad.jsonl"]
        inputs[0].write_text('{"text": broken}\n[1, 2]\n{"body": "x"}\n')
    else:
        inputs = [write_jsonl(tmp_path / "blank.jsonl", ["", ""])]
    proc = run_tool("--input", *inputs, "--output-prefix", tmp_path / "out", "--tokenizer", sp_model,
                    "--skip-malformed", "--workers", 1, check=False)
    line = error_line(proc)
    assert line.startswith(f"preprocess_c4: no documents in {inputs[0]}"), line
    assert not list(tmp_path.glob("out.*")), "no corpus, no sidecar, no work dir"


def test_bad_input_and_arguments_are_one_line_errors(tmp_path, sp_model):
    good = write_jsonl(tmp_path / "good.jsonl", ["some text"])
    clash = write_jsonl(tmp_path / "doc.json", ["a .json input named like the corpus's PREFIX.json"])
    (tmp_path / "bad.model").write_bytes(b"not a model")
    (tmp_path / "a_file").write_text("")
    base = ["--tokenizer", sp_model, "--workers", 1]
    cases = {  # arguments -> what the one line must say
        ("--input", tmp_path / "missing*.jsonl", "--output-prefix", tmp_path / "o", *base):
            f"--input '{tmp_path / 'missing*.jsonl'}' matches no file",
        ("--input", good, "--output-prefix", tmp_path / "o", "--tokenizer", tmp_path / "bad.model"):
            f"{tmp_path / 'bad.model'}: not a SentencePiece model",
        ("--input", good, "--output-prefix", tmp_path / "o", "--tokenizer", tmp_path / "none.model"):
            f"{tmp_path / 'none.model'}: no such tokenizer file",
        ("--input", good, "--output-prefix", tmp_path / "a_file" / "out", *base):
            f"{tmp_path / 'a_file'} is not a directory",
        ("--input", good, "--output-prefix", f"{tmp_path}/", *base): "is a directory; give a file prefix",
        ("--input", clash, "--output-prefix", tmp_path / "doc", *base): f"would overwrite the input {clash}",
    }
    for args, expected in cases.items():
        assert expected in error_line(run_tool(*args, check=False)), args
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob("doc.[!j]*"))

    bad_argument = run_tool("--input", good, "--output-prefix", tmp_path / "o", *base, "--shard-slice", "2/2",
                            check=False)
    assert bad_argument.returncode == 2 and "--shard-slice: '2/2'" in bad_argument.stderr
    debug = run_tool("--input", good, "--output-prefix", tmp_path / "o", "--tokenizer", tmp_path / "none.model",
                     "--debug", check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "NotFoundError" in debug.stderr


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_when_the_tool_is_killed(tmp_path, texts, sp_model):
    """kill -9 of the tool mid-run leaves no worker behind (they would wait on their queue forever)."""
    docs = texts * (16_000_000 // sum(map(len, texts)) + 1)  # ~16 MB: far from done when killed
    write_jsonl(tmp_path / "big.jsonl", docs)
    proc = subprocess.Popen([sys.executable, str(TOOL), "--input", str(tmp_path / "big.jsonl"), "--output-prefix",
                             str(tmp_path / "out"), "--tokenizer", str(sp_model), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        # Both workers started, and results are coming back (the shard's .bin.tmp exists).
        while not (len(_children(proc.pid)) >= 2 and list(tmp_path.glob("out.shards/*.bin.tmp"))):
            assert proc.poll() is None and time.monotonic() < deadline, "the tool ended or never started its workers"
            time.sleep(0.05)
        children = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in children if _alive(pid)], "workers outlived the killed tool"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session, if the test failed
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------------------------
# megamix.data.tokenizer


def test_load_tokenizer_resolves_both_kinds(tmp_path, sp, sp_model, hf_dir):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (32000, 2, 1)
    assert tok.encode_batch(["Hello world", ""]) == [sp.encode("Hello world"), []]

    (tmp_path / "spdir").mkdir()
    (tmp_path / "spdir" / "tokenizer.model").write_bytes(sp_model.read_bytes())
    assert isinstance(load_tokenizer(tmp_path / "spdir"), SentencePieceTokenizer)

    hf = load_tokenizer(hf_dir)
    assert isinstance(hf, HFTokenizer)
    assert hf.eos_id == 2  # <eod>, from tokenizer_config.json
    assert hf.decode(hf.encode("Hello world")) == "Hello world"
    assert hf.encode_batch(["a b", "c"]) == [hf.encode("a b"), hf.encode("c")]

    bare = tmp_path / "bare.json"
    bare.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    assert load_tokenizer(bare).eos_id == 1  # no config: the conventional <|endoftext|>
    assert fingerprint(load_tokenizer(sp_model)) == fingerprint(tok) != fingerprint(hf)

    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_tool_and_tokenizer_never_import_torch(sp_model, hf_dir):
    code = (
        "import sys; sys.path[:0] = ['tools', '.']\n"
        "import preprocess_c4\n"
        "from megamix.data.tokenizer import load_tokenizer\n"
        f"load_tokenizer({str(sp_model)!r}).encode('x'); load_tokenizer({str(hf_dir)!r}).encode('x')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
