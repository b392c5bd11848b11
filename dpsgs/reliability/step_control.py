"""StepControl: the step hooks of a training job's reliability — stop now (a preemption
signal on any rank)? must every rank stop (a NaN/Inf under --on-nonfinite stop)? skip this
update (a non-finite gradient)? — answered by a vote with a deadline at every step boundary."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from dpsgs.comm.grid import Grid
from dpsgs.pipeline.hooks import StepHooks
from dpsgs.reliability.guards import FiniteGuard
from dpsgs.reliability.preemption import DEFAULT_SIGNALS, PreemptionHandler, signal_name
from dpsgs.reliability.votes import BoundedComm, LaggedVote, StepVote

__all__ = ["StepControl"]


class StepControl(StepHooks):
    """What the executor asks at each step boundary: stop admitting batches (preemption, or a
    non-finite value under policy stop)? Owns the signal handler, the NaN guard and the vote.

    Contract: every rank of `comm` runs the same steps (step_done with the same `step`
    sequence) and calls `close` at the same point. The vote is pipelined
    (dpsgs.reliability.votes.LaggedVote, lag K+1 steps) so training does not wait for it: a
    signal or a NaN stops every rank 2(K+1) steps after the step it was seen at, all at the
    same step. `lag=0` votes synchronously. As hooks (dpsgs.pipeline.hooks): step_done votes
    and answers "stop" once a stop is agreed (the executor then cuts its plan and flushes);
    loss and update_ok pass the loss and the averaged gradients through the NaN/Inf guard
    (a non-finite update is skipped)."""

    def __init__(self, comm: Any, *, grid: Grid, rank: int, timeout: float = 300.0,
                 warn_after: float = 60.0, on_nonfinite: str = "stop", lag: int | None = None,
                 signals: Sequence[int] = DEFAULT_SIGNALS,
                 preempt: PreemptionHandler | None = None) -> None:
        self.rank = rank
        self.guard = FiniteGuard(on_nonfinite, rank, grid.coords(rank)[1])
        self.preempt = preempt if preempt is not None else PreemptionHandler(signals).install()
        self.vote = StepVote(comm, 2, timeout, warn_after, label=grid.label)
        self.size = self.vote.size
        self.lag = grid.stages + 1 if lag is None else lag
        self.lagged = LaggedVote(self.vote, self.lag) if self.lag > 0 else None
        self.stop_signal: str | None = None

    def end_of_step(self, step: int) -> str | None:
        """None to go on; the signal name (e.g. 'SIGTERM') when any rank was asked to stop.
        Raises NonFiniteError on every rank when any rank found a NaN/Inf (policy stop)."""
        mine = [self.preempt.signum, self._culprit_code()]
        if self.lagged is None:
            decided = self.vote.vote(step, mine)
        else:
            decided = self.lagged.step(step, mine)
            if decided is None:
                return self.stop_signal
        signum, culprit = decided
        if culprit:
            raise self.guard.error(self._culprit_report(culprit))
        if signum and self.stop_signal is None:
            self.stop_signal = signal_name(signum)
            if self.rank == 0:
                print(f"dpsgs: {self.stop_signal} received: stopping at step {step}, "
                      "flushing and writing a checkpoint (resume with --resume auto)",
                      file=sys.stderr, flush=True)
        return self.stop_signal

    # The vote takes the element-wise max: the code ranks the earliest report first (a NaN
    # spreads downstream and to later steps, so later reports are its effects), then the
    # lowest rank; 0 is "nothing found".
    _FAR = 1 << 40

    def _culprit_code(self) -> int:
        if self.guard.pending is None:
            return 0
        return 1 + (self._FAR - self.guard.pending_step) * self.size + (self.size - 1 - self.rank)

    def _culprit_report(self, code: int) -> str:
        """Collective (every rank decided the same code at the same step): the culprit's own
        report, sent to every rank so the one error line names where it began."""
        culprit = self.size - 1 - (code - 1) % self.size
        mine = self.guard.pending if self.rank == culprit else None
        return self.bounded(self.vote.comm, "the non-finite report").bcast(mine, root=culprit)

    # -- step hooks ------------------------------------------------------------------------
    def step_done(self, step: int) -> bool:
        return self.end_of_step(step) is not None

    def loss(self, step: int, batch: int, loss: float, correct: int, count: int) -> None:
        self.guard.check(step, "loss", [("loss", torch.tensor(loss))], update=False)

    def update_ok(self, step: int, named_grads: Iterable[tuple[str, torch.Tensor | None]]) -> bool:
        return self.guard.check(step, "gradient", named_grads)

    # -- collectives -----------------------------------------------------------------------
    def bounded(self, comm: Any, what: str) -> BoundedComm:
        """`comm` with deadline-checked collectives (see BoundedComm); `what` names the use."""
        return BoundedComm(comm, self.vote, what)

    def close(self) -> None:
        """Collective: finish the rounds in flight, restore the signal handlers."""
        if self.lagged is not None:
            self.lagged.drain()
        self.preempt.uninstall()
        self.vote.free()
