"""The .bin/.idx reader and writer against Megatron-Core's own implementation, and the packed
dataset against a direct concatenation of the documents."""

import warnings

import numpy as np
import pytest

from megamix.data.gpt_dataset import GPTDataset, blend_indices, build_dataset, micro_batches, split_documents
from megamix.data.indexed import IndexedDataError, IndexedDataset, IndexedDatasetWriter

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def random_docs(n=50, vocab=32000, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(0, 300)).astype(np.int64) for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_written_files_read_back_identically(tmp_path, dtype):
    docs = random_docs()
    prefix = str(tmp_path / "mcore")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    import torch
    for d in docs:
        builder.add_document(torch.from_numpy(d), [len(d)])
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    assert ours.dtype == np.dtype(dtype) and len(ours) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ours[i], d.astype(dtype))
    np.testing.assert_array_equal(ours.document_indices, np.arange(len(docs) + 1))


def test_our_files_are_byte_identical_to_megatrons_and_it_reads_them(tmp_path):
    docs = random_docs(seed=1)
    ours_prefix, mcore_prefix = str(tmp_path / "ours"), str(tmp_path / "mcore")
    with IndexedDatasetWriter(ours_prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    import torch
    builder = IndexedDatasetBuilder(mcore_prefix + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_document(torch.from_numpy(d), [len(d)])
    builder.finalize(mcore_prefix + ".idx")
    for ext in (".bin", ".idx"):
        assert open(ours_prefix + ext, "rb").read() == open(mcore_prefix + ext, "rb").read()
    reader = MegatronIndexedDataset(ours_prefix)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(reader[i], d)


def test_slices_read_only_what_is_asked(corpus):
    prefix, docs = corpus
    ds = IndexedDataset(prefix)
    np.testing.assert_array_equal(ds.get(3, 2, 4), docs[3][2:6])
    with pytest.raises(IndexError):
        ds.get(3, 0, len(docs[3]) + 1)


@pytest.mark.parametrize("damage", ["truncate_bin", "truncate_idx", "bad_magic", "missing_bin"])
def test_damaged_files_raise_an_error_naming_the_file(corpus, damage):
    prefix, _ = corpus
    path = {"truncate_bin": ".bin", "truncate_idx": ".idx", "bad_magic": ".idx", "missing_bin": ".bin"}[damage]
    target = prefix + path
    data = open(target, "rb").read()
    if damage.startswith("truncate"):
        open(target, "wb").write(data[:-7])
    elif damage == "bad_magic":
        open(target, "wb").write(b"XXXXXXXXX" + data[9:])
    else:
        import os
        os.remove(target)
    with pytest.raises(IndexedDataError, match=target.split("/")[-1]):
        IndexedDataset(prefix)


def test_a_crashed_writer_leaves_nothing_that_looks_complete(tmp_path):
    prefix = tmp_path / "x"
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_unshuffled_samples_are_consecutive_windows_of_the_document_stream(corpus):
    prefix, docs = corpus
    stream = np.concatenate(docs)
    ds = GPTDataset(IndexedDataset(prefix), np.arange(len(docs)), seq_len=16, num_samples=None, seed=0, shuffle=False)
    assert len(ds) == (len(stream) - 1) // 16
    for i in (0, 1, 7, len(ds) - 1):
        np.testing.assert_array_equal(ds.tokens(i), stream[i * 16: i * 16 + 17])


def test_shuffled_epoch_uses_every_token_once(corpus):
    prefix, docs = corpus
    ds = GPTDataset(IndexedDataset(prefix), np.arange(len(docs)), seq_len=16, num_samples=None, seed=3)
    again = GPTDataset(IndexedDataset(prefix), np.arange(len(docs)), seq_len=16, num_samples=None, seed=3)
    other = GPTDataset(IndexedDataset(prefix), np.arange(len(docs)), seq_len=16, num_samples=None, seed=4)
    np.testing.assert_array_equal(ds.tokens(5), again.tokens(5))
    assert not all(np.array_equal(ds.tokens(i), other.tokens(i)) for i in range(10))
    # One epoch (the default length) is the samples that start in it: their inputs (first 16
    # tokens) tile the epoch's token stream, every token exactly as often as it occurs.
    stream = np.concatenate(docs)
    assert len(ds) == -(-len(stream) // 16)
    used = np.concatenate([ds.tokens(i)[:16] for i in range(len(ds))])
    assert 0 <= len(used) - len(stream) < 16  # the last sample runs into the next epoch
    assert np.all(np.bincount(used, minlength=512) >= np.bincount(stream, minlength=512))
    assert np.bincount(used, minlength=512).sum() - np.bincount(stream, minlength=512).sum() < 16


def test_more_samples_than_one_epoch_take_further_epochs(corpus):
    prefix, docs = corpus
    total = sum(len(d) for d in docs)
    want = 3 * total // 16
    ds = GPTDataset(IndexedDataset(prefix), np.arange(len(docs)), seq_len=16, num_samples=want, seed=0)
    assert len(ds) == want and all(len(ds.tokens(i)) == 17 for i in (0, want - 1))


def test_split_is_by_document_and_covers_all():
    parts = split_documents(100, "98,2")
    assert len(parts["train"]) == 98 and list(parts["valid"]) == [98, 99]
    parts = split_documents(10, "100,0")
    assert len(parts["train"]) == 10 and len(parts["valid"]) == 0


def test_blend_follows_the_weights():
    which, within = blend_indices([0.7, 0.2, 0.1], 1000)
    counts = np.bincount(which)
    assert np.all(np.abs(counts - np.array([700, 200, 100])) <= 1)
    for d in range(3):  # each dataset is read in order, without gaps
        np.testing.assert_array_equal(within[which == d], np.arange(counts[d]))


def test_blended_dataset_from_config_paths(tmp_path):
    from conftest import write_corpus
    write_corpus(tmp_path / "a", seed=1)
    write_corpus(tmp_path / "b", seed=2)
    ds = build_dataset([3, str(tmp_path / "a"), 1, str(tmp_path / "b")], "train", "98,2", 16, 0, num_samples=100)
    assert len(ds) == 100 and np.bincount(ds.which).tolist() == [75, 25]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_global_batch_is_the_same_samples_whatever_the_dp_size(dp):
    for first in (0, 80):
        seen = sorted(i for r in range(dp) for mb in micro_batches(first, 16, 2, r, dp) for i in mb)
        assert seen == list(range(first, first + 16))
