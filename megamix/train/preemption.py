"""A training process as a scheduler's job: it stops cleanly when warned, shows it is alive, and
names itself when it fails.

Schedulers warn before they take the machines away: Slurm sends ``SIGUSR1`` ahead of a time limit
(``#SBATCH --signal=B:USR1@300``, forwarded by ``slurm/train.sbatch``) and ``SIGTERM`` when it
cancels or preempts.  A signal reaches the ranks at slightly different moments and a checkpoint is
a collective, so the handler only records it; at each step boundary :meth:`StopSignals.requested`
takes the maximum over all ranks, so every rank saves the same step, then the trainer raises
:class:`Preempted` and the process exits with :data:`EXIT_PREEMPTED`.  The launcher answers that
code by requeueing the job, and the requeued job resumes from the checkpoint.

:class:`Heartbeat` prints one line per rank every few steps (step time, host, pid), so a hung or
slow rank stands out in a log of many; if the process dies of an exception, it prints a last line
naming the rank, the step and the ``torch.distributed`` call it died in (a collective that timed
out, or whose peer vanished), above Python's traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from types import FrameType, TracebackType

# torch is imported where it is used: ``megamix train`` installs the signal handlers before its
# slow imports, so that a stop signal during start-up is already handled.

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL, "try again later": checkpoint saved, please requeue
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Preempted(SystemExit):
    """Raised once the preemption checkpoint is committed (or, during start-up, at once: there is
    nothing to save yet); uncaught, it exits with ``EXIT_PREEMPTED``."""

    def __init__(self, step: int | None):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


class StopSignals:
    """Records SIGUSR1, SIGTERM and a first SIGINT (Ctrl-C) instead of dying, so the loop can
    checkpoint first; a second SIGINT aborts at once.  Until :meth:`training_started`, a stop signal
    ends the process immediately: during imports, rendezvous, index building and model build there
    is nothing to save, and waiting for the first step could outlast the scheduler's grace period.
    """

    _original: dict[int, object] = {}  # the handlers before any install, restored by uninstall
    _installed: StopSignals | None = None  # the instance recording signals now

    def __init__(self) -> None:
        self.received: int | None = None
        self.started = False

    @classmethod
    def install(cls) -> StopSignals:
        """Handle the stop signals from now on (main thread only: elsewhere Python cannot, and the
        signals keep their usual meaning)."""
        if cls._installed is not None:  # installed early (``megamix train`` does, before its slow start)
            return cls._installed
        stop = cls()
        if threading.current_thread() is threading.main_thread():
            cls._installed = stop
            for sig in STOP_SIGNALS:
                previous = signal.signal(sig, stop._record)
                cls._original.setdefault(sig, previous)
        return stop

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if not self.started:
            print(f"megamix: {signal.Signals(signum).name} during start-up: nothing to save, exiting with "
                  f"{EXIT_PREEMPTED}", file=sys.stderr, flush=True)
            raise Preempted(None)
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if self.received is None:
            self.received = signum
            if signum == signal.SIGINT:
                print("megamix: interrupted: saving a checkpoint at the end of this step (Ctrl-C again to abort)",
                      file=sys.stderr, flush=True)

    def training_started(self) -> None:
        """From now on a stop signal is recorded and acted on at the next step boundary."""
        self.started = True

    @property
    def reason(self) -> str:
        return f"{signal.Signals(self.received).name} received" if self.received else "a peer rank was signalled"

    def requested(self) -> bool:
        """Whether any rank has been signalled; a collective, so every rank calls it at the same step."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a CPU tensor: gloo, beside NCCL on GPUs
        return bool(flag.item())

    def release(self) -> None:
        """Stop handing out this instance from :meth:`install` (its signal is spent), but keep its
        handlers: a second signal while the process exits must not kill it mid-exit."""
        if StopSignals._installed is self:
            StopSignals._installed = None

    def uninstall(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._original.items():
                signal.signal(sig, handler)
            self._original.clear()
            StopSignals._installed = None


class Heartbeat:
    """Per-rank liveness lines, and a last line naming this rank if the process dies of an exception.

    Only parallel runs print heartbeats: one process has the trainer's own log line.
    """

    _current: Heartbeat | None = None  # the heartbeat the failure hook reports for

    def __init__(self, interval: int, step: int = 0):
        self.interval = interval
        self.rank, self.world_size = _rank_and_world()
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.step = step
        self._window_start, self._window_steps, self._slowest = time.perf_counter(), 0, 0.0
        self._step_start = self._window_start
        if sys.excepthook is not _report_failure:
            _report_failure.previous = sys.excepthook
            sys.excepthook = _report_failure
        Heartbeat._current = self

    @property
    def identity(self) -> str:
        return f"rank {self.rank}/{self.world_size} (host {self.host}, pid {self.pid})"

    def beat(self, step: int) -> None:
        """Call after each optimizer step; prints every ``interval`` steps."""
        now = time.perf_counter()
        self._slowest = max(self._slowest, now - self._step_start)
        self._step_start = now
        self._window_steps += 1
        self.step = step
        if step % self.interval or self.world_size == 1:
            return
        mean = (now - self._window_start) / self._window_steps
        print(f"heartbeat {self.identity} step {step} step_time {mean:.3f}s slowest {self._slowest:.3f}s",
              file=sys.stderr, flush=True)
        self._window_start, self._window_steps, self._slowest = now, 0, 0.0

    def close(self) -> None:
        if Heartbeat._current is self:
            Heartbeat._current = None

    def failure_line(self, exc: BaseException, tb: TracebackType | None) -> str:
        frames = traceback.extract_tb(tb)
        torch_call = next((f for f in reversed(frames) if _is_distributed(f.filename)), None)
        ours = next((f for f in reversed(frames) if f"{os.sep}megamix{os.sep}" in f.filename), None)
        where = ""
        if torch_call is not None:
            where += f" in torch.distributed {torch_call.name}"
        if ours is not None:
            where += f" (called from {_short(ours.filename)}:{ours.lineno} {ours.name})"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"megamix: {self.identity} failed after step {self.step}{where}: {type(exc).__name__}: {message}"


def _is_distributed(filename: str) -> bool:
    return f"torch{os.sep}distributed{os.sep}" in filename


def _short(filename: str) -> str:
    return filename[filename.rfind(f"{os.sep}megamix{os.sep}") + 1:]


def _report_failure(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook``: the rank's failure line first, where a log of many ranks is searched."""
    heartbeat = Heartbeat._current
    if heartbeat is not None:
        print(heartbeat.failure_line(exc, tb), file=sys.stderr, flush=True)
    _report_failure.previous(exc_type, exc, tb)


_report_failure.previous = sys.excepthook
