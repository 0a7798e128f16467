"""The training-data index (prefix-stable epochs, cache, blends), the step loader, and the data checks,
each against a reference written here: the token stream rebuilt from the documents, the greedy blend
as a plain Python loop, micro-batches as plain ranges."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, write_corpus

from megamix.data import blend as blend_module
from megamix.data import cache
from megamix.data.gpt_dataset import (
    BlendedDataset,
    DataError,
    GPTDataset,
    build_dataset,
    check_corpus,
    corpus_identity,
    deal_batches,
    micro_batches,
    validation_batches,
)
from megamix.data.index import DocumentEpochs, SampleOrder
from megamix.data.indexed import IndexedDataset
from megamix.data.loader import StepLoader
from megamix.data.sidecar import write_sidecar

SEQ = 16


@pytest.fixture
def small(tmp_path):
    """A 200-document corpus (~6.4K tokens) and its documents."""
    docs = write_corpus(tmp_path / "small", num_docs=200, seed=5)
    return str(tmp_path / "small"), docs


def first_of(epoch: int, tokens: int, seq_len: int) -> int:
    """The first sample whose start lies in ``epoch``: ceil(epoch·T / s)."""
    return math.ceil(epoch * tokens / seq_len)


def reference_stream(docs, orders) -> np.ndarray:
    return np.concatenate([docs[d] for order in orders for d in order]).astype(np.int64)


def dataset(prefix, num_samples=None, seed=3, **kw) -> GPTDataset:
    indexed = IndexedDataset(prefix)
    return GPTDataset(indexed, range(len(indexed)), SEQ, num_samples, seed, **kw)


def sorted_rows(a: np.ndarray) -> np.ndarray:
    """The rows of ``a`` in lexicographic order: equal for two arrays holding the same multiset."""
    return a[np.lexsort(a.T[::-1])]


def rows(ds, indices) -> np.ndarray:
    return np.stack([ds.tokens(i).astype(np.int64) for i in indices])


# -- the order ----------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [1 << 20, 7])
def test_each_epoch_is_a_permutation_of_the_packed_stream_of_a_document_permutation(small, window):
    prefix, docs = small
    total = sum(len(d) for d in docs)
    epochs = 3
    ds = dataset(prefix, num_samples=first_of(epochs, total, SEQ), shuffle_window=window)
    orders = [ds.document_order(e) for e in range(epochs + 1)]
    for order in orders:  # every document once per epoch
        assert sorted(order.tolist()) == list(range(len(docs)))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    stream = reference_stream(docs, orders)
    for e in range(epochs):
        lo, hi = first_of(e, total, SEQ), first_of(e + 1, total, SEQ)
        ours = rows(ds, range(lo, hi))
        packed = np.stack([stream[j * SEQ: j * SEQ + SEQ + 1] for j in range(lo, hi)])
        # The epoch's samples are exactly the packed samples starting in it, in some order ...
        np.testing.assert_array_equal(sorted_rows(ours), sorted_rows(packed))
        # ... and shuffled (epoch e's samples occupy exactly its index range, so precede e+1's).
        assert not np.array_equal(ours, packed)
        assert all(ds.epoch_of(i) == e for i in (lo, hi - 1))


def test_prefix_stable_single_corpus_and_many_epochs(small):
    prefix, docs = small
    total = sum(len(d) for d in docs)
    n = 5 * total // SEQ  # five epochs
    short, long = dataset(prefix, n), dataset(prefix, 2 * n)
    assert len(short) == n and len(long) == 2 * n
    np.testing.assert_array_equal(short.read_batch(range(n)), long.read_batch(range(n)))
    np.testing.assert_array_equal(short.read_batch(range(n)), rows(short, range(n)))


def test_prefix_stable_blends(tmp_path):
    write_corpus(tmp_path / "a", seed=1)
    write_corpus(tmp_path / "b", seed=2)
    write_corpus(tmp_path / "c", seed=3)
    path = [0.5, str(tmp_path / "a"), 0.3, str(tmp_path / "b"), 0.2, str(tmp_path / "c")]
    short = build_dataset(path, "train", "98,2", SEQ, 0, num_samples=3000)
    long = build_dataset(path, "train", "98,2", SEQ, 0, num_samples=6000)
    assert len(short) == 3000 and len(long) == 6000
    np.testing.assert_array_equal(short.read_batch(range(3000)), long.read_batch(range(3000)))
    np.testing.assert_array_equal(long.read_batch([5, 4000]), torch.stack([long[5], long[4000]]).numpy())


def test_many_epochs_over_a_tiny_corpus_start_at_once(tmp_path):
    docs = write_corpus(tmp_path / "tiny", num_docs=2300, seed=7)  # ~75K tokens
    total = sum(len(d) for d in docs)
    seq, last = 256, 76_799_999
    start = time.perf_counter()
    ds = build_dataset(str(tmp_path / "tiny"), "train", "100,0", seq, 11, num_samples=76_800_000)
    far = ds.tokens(last).astype(np.int64)
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"{elapsed:.1f} s"
    # The far sample is one of the packed samples that start in its epoch (the stream of epochs
    # e and e+1 rebuilt from their document orders).
    e = last * seq // total
    assert 200 < e == ds.epoch_of(last)
    stream = reference_stream(docs, [ds.document_order(e), ds.document_order(e + 1)])
    lo, hi = first_of(e, total, seq), first_of(e + 1, total, seq)
    base = e * total
    assert any(np.array_equal(far, stream[j * seq - base: j * seq - base + seq + 1]) for j in range(lo, hi))


def test_validation_is_one_pass_in_corpus_order(small):
    prefix, docs = small
    stream = np.concatenate(docs).astype(np.int64)
    indexed = IndexedDataset(prefix)
    ds = GPTDataset(indexed, range(len(docs)), SEQ, None, 0, shuffle=False)
    assert len(ds) == (len(stream) - 1) // SEQ
    for i in (0, 1, 7, len(ds) - 1):
        np.testing.assert_array_equal(ds.tokens(i), stream[i * SEQ: i * SEQ + SEQ + 1])
    part = GPTDataset(indexed, range(50, 120), SEQ, 10, 0, shuffle=False)  # a range, capped
    tail = np.concatenate(docs[50:120]).astype(np.int64)
    assert len(part) == 10
    np.testing.assert_array_equal(part.read_batch(range(10)), np.stack([tail[i * SEQ: i * SEQ + SEQ + 1]
                                                                       for i in range(10)]))


@pytest.mark.parametrize("use_split", [True, False])
def test_split_applies_only_when_asked(small, use_split):
    prefix, docs = small
    ds = build_dataset(prefix, "train", "90,10", SEQ, 0, use_split=use_split)
    expected = range(180) if use_split else range(200)
    assert sorted(ds.document_order(0).tolist()) == list(expected)
    assert ds.tokens_per_epoch == sum(len(docs[d]) for d in expected)
    valid = build_dataset(prefix, "valid", "90,10", SEQ, 0, use_split=use_split)
    valid_docs = range(180, 200) if use_split else range(200)
    np.testing.assert_array_equal(valid.tokens(0), np.concatenate([docs[d] for d in valid_docs])[:SEQ + 1])


# -- the cache ----------------------------------------------------------------------------------

def cached(prefix, cache_dir, num_samples=400):
    indexed = IndexedDataset(prefix)
    return GPTDataset(indexed, range(len(indexed)), SEQ, num_samples, 3, cache_dir=cache_dir, cache_min_documents=1)


def count_builds(monkeypatch) -> list[int]:
    builds = []
    original = DocumentEpochs._build

    def counting(self, epoch, directory):
        builds.append(epoch)
        return original(self, epoch, directory)

    monkeypatch.setattr(DocumentEpochs, "_build", counting)
    return builds


def test_cache_miss_hit_and_same_samples(small, tmp_path, monkeypatch):
    prefix, _ = small
    builds = count_builds(monkeypatch)
    plain = dataset(prefix, 400)
    first = cached(prefix, tmp_path / "cache")
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert len(entries) == len(builds) >= 2 and all(".epoch" in name for name in entries)  # 400 samples: 2 epochs
    for entry in entries:
        assert {p.name for p in (tmp_path / "cache" / entry).iterdir()} == {"order.npy", "starts.npy", "manifest.json"}
    assert isinstance(first.epochs.epoch(0).starts, np.memmap)  # mapped, not a private copy
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy")}
    second = cached(prefix, tmp_path / "cache")
    assert len(builds) == len(entries)  # a hit: nothing rebuilt
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy")} == mtimes
    for ds in (first, second):
        np.testing.assert_array_equal(ds.read_batch(range(400)), plain.read_batch(range(400)))
    assert len(builds) == len(entries)  # reading every sample needed no epoch beyond those prepared


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_epochs_prepared_are_exactly_those_read(shuffle):
    tokens, seq = 1000, 16
    order = SampleOrder(tokens, seq, seed=2, shuffle=shuffle, window=9)
    touched = 0  # epochs read by samples [0, n), by brute force
    for n in range(1, 250):
        j = order.raw(n - 1)
        touched = max(touched, (j * seq + seq) // tokens + 1)
        assert len(order.epochs_read(n)) == touched, n


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(small, tmp_path, monkeypatch, caplog, damage):
    prefix, _ = small
    cached(prefix, tmp_path / "cache")
    builds = count_builds(monkeypatch)
    entry = next(p for p in (tmp_path / "cache").iterdir() if p.name.startswith("small.epoch0-"))
    target = entry / "starts.npy"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[:-8])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(data)
    else:
        (entry / "manifest.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="megamix.data.cache"):
        ds = cached(prefix, tmp_path / "cache")
    assert builds == [0]
    assert any("damaged" in r.getMessage() and str(entry) in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(ds.read_batch(range(400)), dataset(prefix, 400).read_batch(range(400)))


def test_cache_key_follows_corpus_range_and_seed(small, tmp_path):
    prefix, _ = small
    indexed = IndexedDataset(prefix)
    names = set()
    for docs, seed in ((range(200), 3), (range(180), 3), (range(200), 4)):
        GPTDataset(indexed, docs, SEQ, 10, seed, cache_dir=tmp_path / "c", cache_min_documents=1)
        names |= {p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("small.epoch0-")}
    assert len(names) == 3
    key = DocumentEpochs(indexed, range(200), 3, cache_dir=tmp_path / "c").cache_key(0)
    assert key["corpus"]["idx_bytes"] == os.path.getsize(prefix + ".idx") and key["documents"] == [0, 200]


def test_a_large_index_has_its_offsets_checked_once_per_version(small, tmp_path, monkeypatch):
    from megamix.data import index

    prefix, _ = small
    checks = []

    class Spy(IndexedDataset):
        def __init__(self, prefix, *, check_offsets=True):
            checks.append(check_offsets)
            super().__init__(prefix, check_offsets=check_offsets)

    monkeypatch.setattr(index, "IndexedDataset", Spy)
    monkeypatch.setattr(index, "CACHE_MIN_DOCUMENTS", 1)
    for _ in range(2):
        index.open_corpus(prefix, tmp_path / "cache")
    os.utime(prefix + ".idx", ns=(time.time_ns(), time.time_ns() + 10**9))  # rewritten: checked again
    index.open_corpus(prefix, tmp_path / "cache")
    index.open_corpus(prefix, None)
    assert checks == [True, False, True, True]


def test_racing_builders_publish_one_entry(tmp_path):
    key = {"kind": "test"}
    path = cache.entry_path(tmp_path, "x", key)

    def build(directory):
        cache.save_array(directory, "a", np.arange(10))
        if not path.exists():  # another node (no shared lock) publishes while this one is half-way
            other = tmp_path / ".other"
            other.mkdir()
            cache.save_array(other, "a", np.arange(10))
            cache._write_manifest(other, key, {"n": 10})
            os.rename(other, path)
        return {"n": 10}

    cache.build_entry(path, key, build)
    arrays, meta = cache.open_entry(path, key)
    np.testing.assert_array_equal(arrays["a"], np.arange(10))
    assert meta == {"n": 10} and [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [path.name]


def _distributed_rank(rank: int, prefix: str, cache_dir: str, init: str, out: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    built = []
    original = DocumentEpochs._build
    DocumentEpochs._build = lambda self, e, d: built.append(e) or original(self, e, d)
    ds = cached(prefix, cache_dir)
    Path(out).write_text(json.dumps({"built": built, "tokens": ds.read_batch(range(50)).tolist()}))
    torch.distributed.destroy_process_group()


def test_one_rank_per_node_builds_then_all_map(small, tmp_path):
    prefix, _ = small
    context = torch.multiprocessing.get_context("fork")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [context.Process(target=_distributed_rank,
                             args=(r, prefix, str(tmp_path / "cache"), init, str(tmp_path / f"r{r}.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    assert results[0]["built"] and results[1]["built"] == []
    assert results[0]["tokens"] == results[1]["tokens"] == dataset(prefix, 400).read_batch(range(50)).tolist()


# -- blends -------------------------------------------------------------------------------------

def python_greedy(weights, num_samples):
    """The rule as Megatron states it: sample k from argmax_d (w_d·(k+1) − count_d), lowest on ties."""
    w = np.asarray(weights, dtype=np.float64)
    counts = np.zeros(len(w), dtype=np.int64)
    which, within = [], []
    for k in range(num_samples):
        d = int(np.argmax(w * (k + 1) - counts))
        which.append(d)
        within.append(int(counts[d]))
        counts[d] += 1
    return np.array(which), np.array(within)


WEIGHT_SETS = [[0.5, 0.5], [1 / 3] * 3, [0.7, 0.2, 0.1], [0.45, 0.45, 0.1], [0.6, 0.3, 0.1]]


def test_blend_is_bit_identical_to_the_greedy_loop():
    rng = np.random.default_rng(0)
    ten = rng.random(10)
    sets = WEIGHT_SETS + [list(ten / ten.sum())]
    n = 12_000
    for weights in sets:
        ref_which, ref_within = python_greedy(weights, n)
        for implementation in ("auto", "python"):
            which, within, counts = blend_module.greedy_blend(weights, n, implementation=implementation)
            np.testing.assert_array_equal(which, ref_which, err_msg=f"{implementation} {weights}")
            np.testing.assert_array_equal(within, ref_within)
            np.testing.assert_array_equal(counts, np.bincount(ref_which, minlength=len(weights)))
    # continuing from a prefix's counts gives the rest of the same blend (ref_which: the 10-way one's)
    for implementation in ("auto", "python"):
        head = blend_module.greedy_blend(sets[-1], 5_000, implementation=implementation)
        tail = blend_module.greedy_blend(sets[-1], n - 5_000, first=5_000, counts=head[2],
                                         implementation=implementation)
        np.testing.assert_array_equal(np.concatenate([head[0], tail[0]]), ref_which)


def test_ten_million_sample_blend_builds_fast():
    if blend_module._load_helper() is None:
        pytest.skip("no C compiler: the Python fallback is exact but slow")
    blend_module.greedy_blend([0.5, 0.5], 10)
    start = time.perf_counter()
    which, _, counts = blend_module.greedy_blend(list(np.arange(1, 11) / 55), 10_000_000)
    elapsed = time.perf_counter() - start
    assert elapsed < 2, f"{elapsed:.2f} s"
    assert np.all(np.abs(counts - 10_000_000 * np.arange(1, 11) / 55) <= 1)


def test_blend_index_is_cached_and_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(blend_module, "CACHE_MIN_SAMPLES", 1)
    weights = [0.45, 0.45, 0.1]
    which, within, counts = blend_module.blend_index(weights, 5000, tmp_path)
    assert isinstance(which, np.memmap)
    ref_which, ref_within = python_greedy(weights, 5000)
    np.testing.assert_array_equal(which, ref_which)
    np.testing.assert_array_equal(within, ref_within)
    again = blend_module.blend_index(weights, 5000, tmp_path)
    np.testing.assert_array_equal(again[2], counts)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1


def test_datasets_pickle_as_file_names_not_copies(tmp_path, monkeypatch):
    """Data-loader workers started by spawn receive the dataset pickled: it must reopen its files."""
    monkeypatch.setattr(blend_module, "CACHE_MIN_SAMPLES", 1)
    write_corpus(tmp_path / "a", num_docs=3000, seed=1)
    write_corpus(tmp_path / "b", seed=2)
    path = [0.5, str(tmp_path / "a"), 0.5, str(tmp_path / "b")]
    ds = build_dataset(path, "train", "100,0", SEQ, 0, num_samples=20_000, cache_dir=tmp_path / "cache",
                       cache_min_documents=1000)
    assert isinstance(ds.which, np.memmap) and ds.datasets[0].epochs.cached and not ds.datasets[1].epochs.cached
    data = pickle.dumps(ds)
    assert len(data) < 20_000  # the .idx maps, cached epochs and the blend index are not in it
    some = range(0, 20_000, 97)
    np.testing.assert_array_equal(pickle.loads(data).read_batch(some), ds.read_batch(some))


def test_valid_blend_stops_when_a_part_runs_out(tmp_path):
    write_corpus(tmp_path / "a", seed=1)
    write_corpus(tmp_path / "b", num_docs=40, seed=2)
    ds = build_dataset([0.5, str(tmp_path / "a"), 0.5, str(tmp_path / "b")], "valid", "0,1", SEQ, 0)
    counts = np.bincount(np.asarray(ds.which), minlength=2)
    assert counts[1] == len(ds.datasets[1]) and counts[0] <= len(ds.datasets[0])
    assert len(ds) == counts.sum()
    with pytest.raises(DataError, match="the blend needs"):
        BlendedDataset(ds.datasets, [0.5, 0.5], 10 * len(ds))


# -- micro-batches, validation batches ----------------------------------------------------------

@pytest.mark.parametrize("dp", [1, 2, 4])
def test_a_step_reads_the_global_batch_from_its_first_sample(dp):
    for first in (0, 5, 48):
        per_rank = [micro_batches(first, 16, 2, r, dp) for r in range(dp)]
        assert sorted(i for mbs in per_rank for mb in mbs for i in mb) == list(range(first, first + 16))
        for r, mbs in enumerate(per_rank):  # round k: rank r takes its contiguous slice
            assert mbs == [list(range(first + k * 2 * dp + 2 * r, first + k * 2 * dp + 2 * r + 2))
                           for k in range(16 // (2 * dp))]


def test_validation_batches_by_tokens(small):
    prefix, _ = small
    valid = build_dataset(prefix, "valid", "50,50", SEQ, 0)
    n = len(valid)
    assert validation_batches(valid, 10 * SEQ, 4, SEQ) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 10 samples → 2 batches
    assert validation_batches(valid, 1, 4, SEQ) == [[0, 1, 2, 3]]  # at least one
    assert len(validation_batches(valid, 10**9, 4, SEQ)) == n // 4  # capped by what exists
    batches = validation_batches(valid, 7 * 4 * SEQ, 4, SEQ)
    assert [deal_batches(batches, r, 3) for r in range(3)] == [batches[0::3], batches[1::3], batches[2::3]]
    with pytest.raises(DataError, match="fewer than one micro-batch"):
        validation_batches(valid, 100, n + 1, SEQ)


# -- the loader ---------------------------------------------------------------------------------

def direct_step(ds, first, G, mb, rank, dp):
    return [np.stack([ds.tokens(i).astype(np.int64) for i in batch]) for batch in micro_batches(first, G, mb, rank, dp)]


def test_loader_matches_direct_indexing_with_0_and_2_workers_and_resumes(small):
    prefix, _ = small
    ds = dataset(prefix, 600)
    G, mb, dp = 16, 2, 2
    for workers in (0, 2):
        for rank in range(dp):
            with StepLoader(ds, 0, G, mb, rank, dp, num_workers=workers) as loader:
                for step in range(6):
                    got = loader.next_step()
                    assert all(t.dtype == torch.int64 and t.shape == (mb, SEQ + 1) for t in got)
                    expected = direct_step(ds, step * G, G, mb, rank, dp)
                    np.testing.assert_array_equal(np.stack([t.numpy() for t in got]), np.stack(expected))
                assert loader.consumed == 6 * G
            with StepLoader(ds, 3 * G, G, mb, rank, dp, num_workers=workers) as resumed:  # resume at step 3
                np.testing.assert_array_equal(torch.stack(resumed.next_step()).numpy(),
                                              np.stack(direct_step(ds, 3 * G, G, mb, rank, dp)))


def test_a_changed_global_batch_continues_at_the_consumed_sample(small):
    prefix, _ = small
    ds = dataset(prefix, 600)
    with StepLoader(ds, 0, 8, 2) as loader:
        for _ in range(5):
            loader.next_step()
        consumed = loader.consumed
    assert consumed == 40
    with StepLoader(ds, consumed, 24, 2, num_workers=2) as bigger:
        got = torch.cat(bigger.next_step()).numpy()
    np.testing.assert_array_equal(got, ds.read_batch(range(40, 64)))
    with StepLoader(ds, 600 - 8, 8, 2) as end:
        end.next_step()
        with pytest.raises(StopIteration):
            end.next_step()


def test_workers_ignore_sigint(small):
    prefix, _ = small
    ds = dataset(prefix, 600)
    with StepLoader(ds, 0, 8, 2, num_workers=2) as loader:
        loader.next_step()
        loader.next_step()
        pids = loader.worker_pids()
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        time.sleep(0.3)
        for step in range(2, 6):
            got = torch.cat(loader.next_step()).numpy()
            np.testing.assert_array_equal(got, ds.read_batch(range(8 * step, 8 * step + 8)))
        assert all(alive(pid) for pid in pids)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state and "\nState:\tX" not in state


CHILD = """
import json, sys, time
from megamix.data.gpt_dataset import build_dataset
from megamix.data.loader import StepLoader
ds = build_dataset(sys.argv[1], "train", "100,0", 16, 0, num_samples=10**6)
loader = StepLoader(ds, 0, 8, 2, num_workers=2)
loader.next_step()
print(json.dumps(loader.worker_pids()), flush=True)
time.sleep(120)
"""


def test_workers_die_with_their_parent(small):
    prefix, _ = small
    child = subprocess.Popen([sys.executable, "-c", CHILD, prefix], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        pids = json.loads(child.stdout.readline())
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


# -- token ids and corpus checks ----------------------------------------------------------------

def test_a_token_beyond_the_vocabulary_names_corpus_sample_and_id(tmp_path):
    write_corpus(tmp_path / "c", vocab=600, seed=4)
    ds = dataset(str(tmp_path / "c"), 600, seed=0)
    bad = next(i for i in range(600) if ds.tokens(i).max() >= 512)
    first = bad - bad % 8
    for workers in (0, 2):
        with StepLoader(ds, first, 8, 2, num_workers=workers, vocab_size=512) as loader:
            with pytest.raises(DataError, match=rf"c\.bin: sample {bad} holds token id \d+ >= model.vocab_size 512"):
                loader.next_step()
    with StepLoader(ds, first, 8, 2, vocab_size=600) as loader:
        loader.next_step()


def test_check_corpus_reads_the_sidecar(small):
    prefix, docs = small
    check_corpus(prefix, 512)  # no sidecar: passes (checked per batch instead)
    tokens = sum(len(d) for d in docs)
    max_id = int(max(d.max() for d in docs))

    def sidecar(**over):
        fields = dict(tokenizer_name="t", tokenizer_fingerprint="abc", vocab_size=512, eos_id=None,
                      documents=len(docs), tokens=tokens, max_id=max_id)
        write_sidecar(prefix, **{**fields, **over})

    sidecar()
    check_corpus(prefix, 512, "abc")
    check_corpus([0.5, prefix, 0.5, prefix], 512)
    with pytest.raises(DataError, match=rf"token ids up to {max_id}.*>= model.vocab_size {max_id}"):
        check_corpus(prefix, max_id)
    with pytest.raises(DataError, match="fingerprint"):
        check_corpus(prefix, 512, "xyz")
    sidecar(documents=len(docs) + 1)
    with pytest.raises(DataError, match="not this corpus's sidecar"):
        check_corpus(prefix, 512)


def test_corpus_identity_is_stable_json_and_follows_the_data(small, tmp_path):
    prefix, _ = small
    ident = corpus_identity(prefix)
    code = ("import json; from megamix.data.checks import corpus_identity; "
            f"print(json.dumps(corpus_identity({prefix!r})))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(other.stdout) == json.loads(json.dumps(ident))
    write_corpus(tmp_path / "other", seed=9)
    assert corpus_identity(str(tmp_path / "other"))["corpora"][0]["idx_digest"] != ident["corpora"][0]["idx_digest"]
    write_sidecar(prefix, tokenizer_name="t", tokenizer_fingerprint="abc", vocab_size=512, eos_id=None,
                  documents=200, tokens=1, max_id=1)
    assert corpus_identity(prefix)["corpora"][0]["tokenizer_fingerprint"] == "abc"
