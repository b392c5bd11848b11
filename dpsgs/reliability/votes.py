"""Votes: all ranks agree on a few integers (element-wise max) with a deadline and a
Horovod-style stall report naming the ranks that have not arrived.

Rank 0 gathers one tiny message per rank — point-to-point rather than an allreduce, so that
it knows *who* is missing — takes the element-wise max and sends it back. Waits poll with
back-off (never spinning a core another rank needs); after `warn_after` seconds they print
which ranks are missing, after `timeout` seconds they raise `VoteTimeout` (the trainer then
aborts the job). `StepVote.vote` is synchronous; `LaggedVote` pipelines one round per step
so that training never waits for it; `BoundedComm` puts a vote before blocking collectives.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpsgs.comm.waits import poll

__all__ = ["VoteTimeout", "StepVote", "LaggedVote", "BoundedComm"]

_TAG_UP, _TAG_DOWN = 71, 72                 # synchronous votes
_TAG_UP_LAGGED, _TAG_DOWN_LAGGED = 73, 74   # pipelined rounds (FIFO per source and tag)
_COORDINATOR_GRACE = 2.0   # non-root ranks wait a little longer, so rank 0 (which knows
                           # who is missing) is the one that reports and aborts


class VoteTimeout(TimeoutError):
    """A step-boundary vote passed its deadline; the message names the missing ranks."""


class StepVote:
    """Element-wise MAX of a few int64 values over all ranks, with deadline + stall report."""

    def __init__(self, comm: Any, width: int, timeout: float = 300.0, warn_after: float = 60.0,
                 label: Callable[[int], str] | None = None) -> None:
        self.comm = comm.Dup()      # collective; keeps our tags away from the caller's traffic
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.width, self.timeout, self.warn_after = width, timeout, warn_after
        self.label = label or (lambda r: f"rank {r}")
        self._keep: list[Any] = []  # buffers of pending requests stay alive until an abort
        self._what = ""

    def vote(self, step: int, values: Sequence[int], what: str = "") -> list[int]:
        """`what` names the occasion in stall/timeout messages (default: the step)."""
        self._what = what or f"step-boundary vote at step {step}"
        mine = np.array([step, *values], dtype=np.int64)
        if len(mine) != self.width + 1:
            raise ValueError(f"vote expects {self.width} values, got {len(values)}")
        if self.size == 1:
            return [int(v) for v in mine[1:]]
        return self._root(step, mine) if self.rank == 0 else self._leaf(step, mine)

    def _root(self, step: int, mine: np.ndarray) -> list[int]:
        bufs = {r: np.empty_like(mine) for r in range(1, self.size)}
        reqs = {r: self.comm.Irecv(bufs[r], source=r, tag=_TAG_UP) for r in bufs}
        self._keep = [bufs]
        self._wait(reqs, step, "waiting for", self.timeout)
        result = mine.copy()
        for r, b in bufs.items():
            if b[0] != step:    # ranks out of step = a trainer bug; say so rather than mix
                raise RuntimeError(f"step-boundary vote: {self.label(r)} voted at step "
                                   f"{int(b[0])} while rank 0 is at step {step}")
            np.maximum(result, b, out=result)
        result[0] = step
        sends = {r: self.comm.Isend(result, dest=r, tag=_TAG_DOWN) for r in bufs}
        self._keep = [result]
        self._wait(sends, step, "sending the decision to", self.timeout)
        return [int(v) for v in result[1:]]

    def _leaf(self, step: int, mine: np.ndarray) -> list[int]:
        result = np.empty_like(mine)
        reqs = {0: self.comm.Isend(mine, dest=0, tag=_TAG_UP)}
        down = self.comm.Irecv(result, source=0, tag=_TAG_DOWN)
        self._keep = [mine, result]
        self._wait(reqs, step, "sending to", self.timeout + _COORDINATOR_GRACE)
        self._wait({0: down}, step, "waiting for the answer of",
                   self.timeout + _COORDINATOR_GRACE)
        return [int(v) for v in result[1:]]

    def _wait(self, reqs: dict[int, Any], step: int, doing: str, timeout: float) -> None:
        def done() -> bool:
            for r in [r for r, q in reqs.items() if q.Test()]:
                del reqs[r]
            return not reqs

        def missing() -> str:
            return ", ".join(self.label(r) for r in sorted(reqs))

        poll(done, timeout,
             lambda t: VoteTimeout(f"rank {self.rank}: {self._what} timed out after {t:.1f} s {doing} "
                                   f"{missing()}: that rank is dead or stuck (its own log, or "
                                   "mpirun's exit codes, say which)"),
             stall=lambda waited: (f"dpsgs stall: rank {self.rank} has been {doing} {missing()} for "
                                   f"{waited:.0f} s in the {self._what} (timeout {timeout:.0f} s)"),
             warn_after=self.warn_after)

    def free(self) -> None:
        self.comm.Free()


class BoundedComm:
    """An mpi4py communicator whose blocking collectives (bcast, gather, allgather, barrier)
    first pass an arrival check with a deadline (the vote), so a peer that died meanwhile
    raises VoteTimeout naming it instead of blocking every survivor forever. Used for the
    collectives of a checkpoint save; every other attribute is the communicator's own.
    Contract: every rank calls the same collectives in the same order (as MPI requires)."""

    def __init__(self, comm: Any, vote: StepVote, what: str) -> None:
        self._comm, self._vote, self._what = comm, vote, what
        self._calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)

    def _arrive(self, op: str) -> None:
        self._calls += 1
        # negative "steps" keep these arrivals apart from the step votes in the root's check
        self._vote.vote(-self._calls, [0, 0], f"{op} of the {self._what}")

    def bcast(self, obj: Any, root: int = 0) -> Any:
        self._arrive("bcast")
        return self._comm.bcast(obj, root=root)

    def gather(self, obj: Any, root: int = 0) -> Any:
        self._arrive("gather")
        return self._comm.gather(obj, root=root)

    def allgather(self, obj: Any) -> Any:
        self._arrive("allgather")
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        self._arrive("barrier")

    Barrier = barrier


@dataclass
class _Round:
    step: int
    mine: np.ndarray
    result: np.ndarray
    recvs: dict[int, Any] | None = None      # root: the leaves' votes
    bufs: dict[int, np.ndarray] | None = None
    sends: dict[int, Any] | None = None      # root: the answers (None = not decided yet);
                                             # leaf: its vote
    answer: Any = None                       # leaf: the answer's receive


class LaggedVote:
    """One vote round per step, pipelined so that nobody waits for it in the normal case.

    Round t is posted at the end of step t; rank 0 decides it at the end of step t + lag
    (by then every rank has normally posted it: ranks of a pipeline drift apart by fewer
    than `lag` steps) and every rank acts on it at the end of step t + 2*lag (by then the
    answer has normally arrived). All ranks act on the same round at the same step, so the
    decision is still collective; it just comes 2*lag steps late. Deadlines and stall
    reports are those of the StepVote. `drain` completes every round in flight (collective:
    call it at the same point on every rank, before the communicator is freed)."""

    def __init__(self, vote: StepVote, lag: int) -> None:
        self.v, self.lag = vote, max(1, lag)
        self.rounds: deque[_Round] = deque()

    def step(self, step: int, values: Sequence[int]) -> list[int] | None:
        """Post this step's values; the decided values of round step - 2*lag, or None."""
        v = self.v
        mine = np.array([step, *values], dtype=np.int64)
        if v.size == 1:
            return [int(x) for x in mine[1:]]
        r = _Round(step, mine, np.empty_like(mine))
        if v.rank == 0:
            r.bufs = {q: np.empty_like(mine) for q in range(1, v.size)}
            r.recvs = {q: v.comm.Irecv(r.bufs[q], source=q, tag=_TAG_UP_LAGGED) for q in r.bufs}
        else:
            r.sends = {0: v.comm.Isend(mine, dest=0, tag=_TAG_UP_LAGGED)}
            r.answer = v.comm.Irecv(r.result, source=0, tag=_TAG_DOWN_LAGGED)
        self.rounds.append(r)
        if v.rank == 0:
            for old in self.rounds:
                if old.sends is None and old.step <= step - self.lag:
                    self._decide(old)
        if self.rounds[0].step <= step - 2 * self.lag:
            return self._finish(self.rounds.popleft())
        return None

    def _decide(self, r: _Round) -> None:
        v = self.v
        v._what = f"step-boundary vote of step {r.step}"
        v._wait(dict(r.recvs), r.step, "waiting for", v.timeout)
        r.result[:] = r.mine
        for q, b in r.bufs.items():
            if b[0] != r.step:
                raise RuntimeError(f"step-boundary vote: {v.label(q)} voted at step "
                                   f"{int(b[0])} while rank 0 is at step {r.step}")
            np.maximum(r.result, b, out=r.result)
        r.sends = {q: v.comm.Isend(r.result, dest=q, tag=_TAG_DOWN_LAGGED) for q in r.bufs}

    def _finish(self, r: _Round) -> list[int]:
        v = self.v
        v._what = f"step-boundary vote of step {r.step}"
        if v.rank == 0:
            if r.sends is None:
                self._decide(r)
            v._wait(dict(r.sends), r.step, "sending the decision to", v.timeout)
        else:
            grace = v.timeout + _COORDINATOR_GRACE
            v._wait(dict(r.sends), r.step, "sending to", grace)
            v._wait({0: r.answer}, r.step, "waiting for the answer of", grace)
        return [int(x) for x in r.result[1:]]

    def drain(self) -> list[list[int]]:
        """Complete every round in flight; their decided values, oldest first."""
        done = []
        while self.rounds:
            done.append(self._finish(self.rounds.popleft()))
        return done
