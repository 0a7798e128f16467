"""Micro-batches for the training loop, read ahead by worker processes.

:class:`StepLoader` yields, step after step, this data-parallel rank's micro-batches of the global
batch (:func:`micro_batches`): a ``torch.utils.data.DataLoader`` whose batch sampler walks the
global sample index from the first sample of the step the run starts at.  That position (the
samples consumed, :attr:`StepLoader.consumed`) is all a checkpoint needs: a resumed run, on any
layout and after a change of global batch size, continues with the next unread sample.  Reading is
deterministic (no randomness in workers: the order is the dataset's), so 0 and N workers give the
same tensors.

Workers (``num_workers > 0``) read and check batches while the model computes.  They ignore
SIGINT, SIGTERM and SIGUSR1 (the trainer's main process handles those: a checkpoint on preemption
must not lose its data workers mid-way) and die with their parent: ``PR_SET_PDEATHSIG`` (Linux),
plus a check that the parent is alive when the worker starts, in case it died before that.  Note
that PDEATHSIG fires when the *thread* that started the workers exits: create the loader (and
iterate it first) on the main thread.  For a CUDA device batches are pinned, and the next step's
micro-batches are copied to the device on a side stream while the current step computes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys

import numpy as np
import torch

from megamix.data.checks import check_tokens
from megamix.data.gpt_dataset import micro_batches, read_batch

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_init(parent_pid: int, worker_id: int) -> None:
    """Runs first in every worker: leave signals to the main process, die with it."""
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if not _parent_alive(parent_pid):  # it died before PDEATHSIG was armed
        os._exit(1)


class RankStepSampler(torch.utils.data.Sampler):
    """A batch sampler: for each optimizer step from the one that starts at global sample
    ``first_sample``, this rank's micro-batch index lists (:func:`micro_batches`), concatenated in
    order into one list; stops before a step the dataset cannot fill.

    One DataLoader item per step, not per micro-batch: each item crosses from a worker through its
    own shared-memory segment, about a millisecond apiece, which capped two workers at 4.5K
    samples/s with one item per 8-sample micro-batch and lets them reach 52K with one per step.
    """

    def __init__(self, first_sample: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_samples: int | None = None):
        micro_batches(0, global_batch_size, micro_batch_size, dp_rank, dp_size)  # validates the layout
        self.first_sample, self.global_batch_size = first_sample, global_batch_size
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.num_samples = num_samples

    def __iter__(self):
        first = self.first_sample
        while self.num_samples is None or first + self.global_batch_size <= self.num_samples:
            rounds = micro_batches(first, self.global_batch_size, self.micro_batch_size, self.dp_rank, self.dp_size)
            yield [i for batch in rounds for i in batch]
            first += self.global_batch_size


class MicroBatchReader(torch.utils.data.Dataset):
    """``reader.__getitems__(indices)`` (how a DataLoader fetches a batch when the dataset has it):
    the samples ``indices`` of ``dataset`` as one int64 tensor ``[len(indices), seq_len + 1]``, read
    in one go, token ids checked against ``vocab_size`` (a max per batch)."""

    def __init__(self, dataset, vocab_size: int | None = None):
        self.dataset, self.vocab_size = dataset, vocab_size

    def source(self, i: int) -> str:
        if hasattr(self.dataset, "source"):
            return self.dataset.source(i)
        return str(getattr(self.dataset, "prefix", type(self.dataset).__name__))

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        tokens = read_batch(self.dataset, indices)
        if self.vocab_size is not None:
            check_tokens(tokens, self.vocab_size, indices, self.source)
        return torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.__getitems__([i])[0]


def _as_read(batch: torch.Tensor) -> torch.Tensor:
    """The loader's collate_fn: :meth:`MicroBatchReader.__getitems__` already stacked the step."""
    return batch


class StepLoader:
    """Iterates optimizer steps: each item is this rank's list of micro-batch int64 tensors
    ``[micro_batch_size, seq_len + 1]`` on ``device``, for the steps starting at ``first_sample``.

    ``next_step()`` raises StopIteration past the dataset's end; :attr:`consumed` is the first
    global sample of the next step (what to save for a resume).  Call :meth:`close` (or use it as a
    context manager) to stop the workers.
    """

    def __init__(self, dataset, first_sample: int, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, num_workers: int = 0, device: torch.device | str = "cpu",
                 vocab_size: int | None = None, *, prefetch_factor: int = 4):
        self.device = torch.device(device)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.consumed = first_sample
        sampler = RankStepSampler(first_sample, global_batch_size, micro_batch_size, dp_rank, dp_size, len(dataset))
        cuda = self.device.type == "cuda"
        extra = {}
        if num_workers > 0:
            extra = {"prefetch_factor": prefetch_factor, "worker_init_fn": functools.partial(_worker_init, os.getpid())}
        self.loader = torch.utils.data.DataLoader(
            MicroBatchReader(dataset, vocab_size), batch_sampler=sampler, collate_fn=_as_read,
            num_workers=num_workers, pin_memory=cuda, **extra,
        )
        self._iterator = iter(self.loader)
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._ahead: list[torch.Tensor] | None = None
        self._exhausted = False

    def _fetch(self) -> list[torch.Tensor]:
        """The next step's samples, on the device (copy started on the side stream for CUDA), cut
        into micro-batches (views of one tensor: one pinned buffer, one copy per step)."""
        host = next(self._iterator)
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                tokens = host.to(self.device, non_blocking=True)
        else:
            tokens = host.to(self.device)
        return list(tokens.split(self.micro_batch_size))

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches of the next optimizer step."""
        if self._ahead is not None:
            step, self._ahead = self._ahead, None
        elif self._exhausted:
            raise StopIteration
        else:
            step = self._fetch()
        if self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            step[0].record_stream(current)  # the block of the storage all micro-batches share
            try:  # start copying the next step while this one computes
                self._ahead = self._fetch()
            except StopIteration:
                self._exhausted = True
        self.consumed += self.global_batch_size
        return step

    def __iter__(self):
        return self

    def __next__(self) -> list[torch.Tensor]:
        return self.next_step()

    def worker_pids(self) -> list[int]:
        return [w.pid for w in getattr(self._iterator, "_workers", [])]

    def close(self) -> None:
        """Stop the workers (those that ignore the DataLoader's SIGTERM are killed)."""
        iterator, self._iterator = getattr(self, "_iterator", None), None
        if iterator is None:
            return
        workers = list(getattr(iterator, "_workers", []))
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        self._ahead = None

    def __enter__(self) -> StepLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
