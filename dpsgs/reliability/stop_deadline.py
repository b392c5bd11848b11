"""StopDeadline: after a stop signal the job ends within a bounded grace, even when a rank is stuck.

SIGTERM only sets a flag that the ranks agree on at a step boundary (preemption.py); a rank
that is stopped (`kill -STOP`, a frozen node) or stuck never gets there, and its peers would
wait in their channels and votes until --timeout — long after the batch system's SIGKILL
(Slurm's KillWait: 30 s by default). So every rank runs a watchdog thread with a
communicator of its own. When the job has not ended `grace - answer_s` seconds after this
rank got a stop signal (the clean stop — flush, checkpoint, end — normally takes a fraction
of that), it starts a roll call: one tiny message to every rank. A rank's watchdog that
receives one answers the same way, whether its rank had the signal or not. After
`answer_s` seconds (at most half the grace) the ranks not heard from are frozen: not even
their threads run. The lowest rank heard from prints one line naming them and the newest
committed checkpoint (saves are atomic: one cut short leaves the previous checkpoint the
newest), and the job ends with EXIT_CODE, `grace` seconds after the signal. Frozen ranks are named; a rank whose threads still run but whose main
thread is stuck answers, and the line then says that every rank answered.

Needs MPI_THREAD_MULTIPLE (mpi4py's default); without it the watchdog is not started and
--timeout alone bounds the wait.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dpsgs.comm.abort import abort_job
from dpsgs.reliability.preemption import PreemptionHandler, signal_name

__all__ = ["EXIT_CODE", "StopDeadline"]

EXIT_CODE = 143             # 128 + SIGTERM: ended because of the stop signal
_TAG = 75
_POLL_S = 0.1


class StopDeadline:
    """The watchdog of one rank (see the module docstring). Collective to build (it duplicates
    `comm`); `start` it once every rank has one, `stop` it before MPI_Finalize.
    `label(rank)` names a rank; `last_checkpoint()` says which checkpoint is the newest
    committed one (or None)."""

    def __init__(self, comm: Any, handler: PreemptionHandler, grace: float, *,
                 label: Callable[[int], str] = lambda r: f"rank {r}",
                 last_checkpoint: Callable[[], str | None] = lambda: None,
                 answer_s: float = 2.0) -> None:
        from mpi4py import MPI

        self.handler, self.grace = handler, grace
        self.answer_s = min(answer_s, grace / 2)
        self.label, self.last_checkpoint = label, last_checkpoint
        self.comm = comm.Dup()          # collective: keeps the roll call off every other tag
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.enabled = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "StopDeadline":
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="dpsgs stop deadline")
            self._thread.start()
        return self

    def stop(self) -> None:
        """The job ends normally: end the watchdog (it cancels its receive). A roll call
        already under way ends the job itself within answer_s + a few seconds."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(self.answer_s + 5.0)
            self._thread = None

    # -- the watchdog thread ---------------------------------------------------------------
    def _watch(self) -> None:
        from mpi4py import MPI

        heard: set[int] = set()
        buf = np.zeros(1, dtype=np.int64)
        status = MPI.Status()
        req = self.comm.Irecv(buf, source=MPI.ANY_SOURCE, tag=_TAG)
        while not self._stopped.wait(_POLL_S):
            if req.Test(status):                     # another rank started a roll call
                heard.add(status.Get_source())
                req = self.comm.Irecv(buf, source=MPI.ANY_SOURCE, tag=_TAG)
                break
            since = self.handler.received_at
            if self.handler.signum and time.monotonic() - since >= self.grace - self.answer_s:
                break
        else:
            req.Cancel()
            req.Wait()
            return
        self._roll_call(req, buf, status, heard)

    def _roll_call(self, req: Any, buf: np.ndarray, status: Any, heard: set[int]) -> None:
        from mpi4py import MPI

        mine = np.array([self.rank], dtype=np.int64)
        sends = [self.comm.Isend(mine, dest=r, tag=_TAG) for r in range(self.size) if r != self.rank]
        deadline = time.monotonic() + self.answer_s
        while len(heard) < self.size - 1 and time.monotonic() < deadline:
            if req.Test(status):
                heard.add(status.Get_source())
                req = self.comm.Irecv(buf, source=MPI.ANY_SOURCE, tag=_TAG)
            else:
                time.sleep(0.01)
        del sends                                    # small: sent eagerly; the abort ends them
        missing = [r for r in range(self.size) if r != self.rank and r not in heard]
        if self.rank == min(heard | {self.rank}):    # the lowest rank that answered says it
            print(self._line(missing), file=sys.stderr, flush=True)
        else:
            time.sleep(self.answer_s)                # that rank ends the job; if it cannot, we do
        abort_job(EXIT_CODE)

    def _line(self, missing: list[int]) -> str:
        what = signal_name(self.handler.signum) if self.handler.signum else "a stop signal"
        head = f"dpsgs: {what}: the job did not stop within --stop-grace {self.grace:g} s"
        if missing:
            names = ", ".join(self.label(r) for r in missing)
            why = f"{names} did not answer (stopped or frozen)"
        else:
            why = ("every rank answered (a rank's main thread is stuck, or the clean stop "
                   "needs more time: raise --stop-grace)")
        try:
            last = self.last_checkpoint()
        except Exception as e:  # noqa: BLE001 - the line goes out whatever the folder holds
            last = f"unknown ({type(e).__name__}: {e})"
        kept = (f"the newest checkpoint, {last}, is kept (resume with --resume auto)" if last
                else "no checkpoint was written yet")
        return f"{head}: {why}; ending the job now (exit {EXIT_CODE}) without a new checkpoint; {kept}"
