"""StepControl: the step hooks of a training job's reliability — stop now (a preemption
signal on any rank)? must every rank stop (a NaN/Inf under --on-nonfinite stop, a metrics
file that cannot be written)? skip this update (a non-finite gradient)? — answered by a vote
with a deadline at every step boundary."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from dpsgs.comm.grid import Grid
from dpsgs.pipeline.hooks import StepHooks
from dpsgs.reliability.guards import FiniteGuard
from dpsgs.reliability.preemption import DEFAULT_SIGNALS, PreemptionHandler, signal_name
from dpsgs.reliability.votes import BoundedComm, LaggedVote, StepVote

__all__ = ["RankFailure", "StepControl", "ORIGIN_ORDER"]

# What a rank found, in the order that names the origin when several ranks report at the
# same step: a NaN input or loss makes the averaged gradients of its stage non-finite on
# every replica at that very step, so those are effects, never the origin. A rank's other
# failure (a metrics file that cannot be written) is named before any of them.
ORIGIN_ORDER = ("gradient", "activation", "loss", "input", "failure")


class RankFailure(RuntimeError):
    """Training stopped on every rank because one rank cannot go on (its metrics file cannot
    be written); the message names the rank and what failed."""


class StepControl(StepHooks):
    """What the executor asks at each step boundary: stop admitting batches (preemption, or a
    non-finite value under policy stop)? Owns the signal handler, the NaN guard and the vote.

    Contract: every rank of `comm` runs the same steps (step_done with the same `step`
    sequence) and calls `settle` and `close` at the same point. The vote is pipelined
    (dpsgs.reliability.votes.LaggedVote, lag K+1 steps) so training does not wait for it: a
    signal or a NaN stops every rank 2(K+1) steps after the step it was seen at, all at the
    same step. `lag=0` votes synchronously. As hooks (dpsgs.pipeline.hooks): step_done votes
    and answers "stop" once a stop is agreed (the executor then cuts its plan and flushes);
    loss and update_ok pass the loss and the averaged gradients through the NaN/Inf guard
    (a non-finite update is skipped; with `late_guard`, policy stop, it is read a step late
    and the run stops at the vote as before). `health` (polled at each step boundary)
    returns one line when this rank cannot go on (its metrics file cannot be written): every
    rank then stops with RankFailure, the first such line as its message."""

    def __init__(self, comm: Any, *, grid: Grid, rank: int, timeout: float = 300.0,
                 warn_after: float = 60.0, on_nonfinite: str = "stop", lag: int | None = None,
                 signals: Sequence[int] = DEFAULT_SIGNALS,
                 preempt: PreemptionHandler | None = None,
                 health: Callable[[], str | None] | None = None, late_guard: bool = False) -> None:
        self.rank = rank
        self.label = grid.label(rank)
        self.guard = FiniteGuard(on_nonfinite, rank, grid.coords(rank)[1])
        # a device behind the host (CUDA, the simulator) under policy stop: the gradient check
        # reads its flag a step late (FiniteGuard.check_late), no host sync per update
        self.late_guard = late_guard and on_nonfinite == "stop"
        self.preempt = preempt if preempt is not None else PreemptionHandler(signals).install()
        self.health = health
        self.failure: tuple[int, str] | None = None     # (step, line) from health
        self.vote = StepVote(comm, 2, timeout, warn_after, label=grid.label)
        self.size = self.vote.size
        self.lag = grid.stages + 1 if lag is None else lag
        self.lagged = LaggedVote(self.vote, self.lag) if self.lag > 0 else None
        self.stop_signal: str | None = None

    def end_of_step(self, step: int) -> str | None:
        """None to go on; the signal name (e.g. 'SIGTERM') when any rank was asked to stop.
        Raises NonFiniteError on every rank when any rank found a NaN/Inf (policy stop), and
        RankFailure when any rank's health check failed."""
        mine = self._mine(step)
        if self.lagged is None:
            decided = self.vote.vote(step, mine)
        else:
            decided = self.lagged.step(step, mine)
            if decided is None:
                return self.stop_signal
        return self._act(step, decided)

    def settle(self, step: int) -> None:
        """Collective, at the end of training: act on the rounds still in flight and on one
        last synchronous round, so a NaN or a failure found in the last steps (or after them:
        the last metrics lines) still stops every rank with its one error."""
        self.guard.resolve_late()
        decided = [0, 0]
        if self.lagged is not None:
            for got in self.lagged.drain():
                decided = [max(a, b) for a, b in zip(decided, got)]
        last = self.vote.vote(step, self._mine(step), "end-of-training check")
        self._act(step, [max(a, b) for a, b in zip(decided, last)], stopping=False)

    def before_checkpoint(self, step: int) -> None:
        """Collective, just before a checkpoint is written: with `late_guard`, the last update
        was applied before its flag was read, so read it now and vote at once; a NaN or Inf
        anywhere stops every rank with its one error before a checkpoint could keep it.
        Nothing to do otherwise (a non-finite update was skipped when it was found)."""
        if not self.late_guard:
            return
        self.guard.resolve_late()
        decided = self.vote.vote(step, self._mine(step), "check before the checkpoint")
        self._act(step, decided, stopping=False)

    def _mine(self, step: int) -> list[int]:
        if self.failure is None and self.health is not None:
            text = self.health()
            if text:
                self.failure = (step, text)
        return [self.preempt.signum, self._culprit_code()]

    def _act(self, step: int, decided: Sequence[int], stopping: bool = True) -> str | None:
        signum, culprit = decided
        if culprit:
            kind, report = self._culprit_report(culprit)
            if kind == "failure":
                raise RankFailure(f"{report}; training stopped")
            raise self.guard.error(report)
        if stopping and signum and self.stop_signal is None:
            self.stop_signal = signal_name(signum)
            if self.rank == 0:
                print(f"dpsgs: {self.stop_signal} received: stopping at step {step}, "
                      "flushing and writing a checkpoint (resume with --resume auto)",
                      file=sys.stderr, flush=True)
        return self.stop_signal

    # The vote takes the element-wise max: the code ranks the earliest report first (a NaN
    # spreads downstream and to later steps, so later reports are its effects), then the
    # kind (ORIGIN_ORDER), then the lowest rank; 0 is "nothing found".
    _FAR = 1 << 40

    def _first_report(self) -> tuple[int, str, str] | None:
        """(step, kind, report) of the earliest thing this rank found, if any."""
        found = []
        if self.guard.pending is not None:
            what = self.guard.pending_what if self.guard.pending_what in ORIGIN_ORDER else "gradient"
            found.append((self.guard.pending_step, what, self.guard.pending))
        if self.failure is not None:
            found.append((self.failure[0], "failure", f"{self.label}: {self.failure[1]}"))
        return min(found, key=lambda f: (f[0], -ORIGIN_ORDER.index(f[1]))) if found else None

    def _culprit_code(self) -> int:
        first = self._first_report()
        if first is None:
            return 0
        step, kind, _ = first
        rank_of = (self._FAR - step) * len(ORIGIN_ORDER) + ORIGIN_ORDER.index(kind)
        return 1 + rank_of * self.size + (self.size - 1 - self.rank)

    def _culprit_report(self, code: int) -> tuple[str, str]:
        """Collective (every rank decided the same code at the same step): the culprit's own
        (kind, report), sent to every rank so the one error line names where it began."""
        culprit = self.size - 1 - (code - 1) % self.size
        mine = None
        if self.rank == culprit:
            _, kind, report = self._first_report()  # type: ignore[misc]
            mine = (kind, report)
        return self.bounded(self.vote.comm, "the culprit's report").bcast(mine, root=culprit)

    # -- step hooks ------------------------------------------------------------------------
    def step_done(self, step: int) -> bool:
        return self.end_of_step(step) is not None

    def loss(self, step: int, batch: int, loss: float, correct: int, count: int) -> None:
        self.guard.check(step, "loss", [("loss", torch.tensor(loss))], update=False)

    def update_ok(self, step: int, named_grads: Iterable[tuple[str, torch.Tensor | None]]) -> bool:
        if self.late_guard:
            return self.guard.check_late(step, "gradient", named_grads)
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
