"""StepControl: what the trainer asks at every step boundary — stop now (a preemption
signal on any rank)? must every rank stop (a NaN/Inf under --on-nonfinite stop)? — and the
hooks that put the answers, the NaN/Inf guard and the fault points into a StageWorker."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from dpsgs.reliability.votes import BoundedComm, LaggedVote, StepVote, rank_label
from dpsgs.reliability.guards import FiniteGuard
from dpsgs.reliability.preemption import DEFAULT_SIGNALS, PreemptionHandler, signal_name

__all__ = ["StepControl", "cut_segment"]


def cut_segment(plan: list, seg: list, done: int, overlap: str = "backward") -> bool:
    """Stop admitting batches after the first `done` steps of a running fdg `plan` over
    `seg`: in place, the rest of the plan becomes the flush of the batches admitted so far
    (stage 0 forwarded batches 0..done-1) and `seg` keeps only those. The fdg plan is a pure
    function of the batch count, and the cut plan agrees with the running one on every step
    already executed (checked). False (nothing changed) when no batch is left to drop."""
    from dpsgs.pipeline.schedule import fdg_plan

    if not plan or done >= len(seg):
        return False
    cut = fdg_plan(len(plan[0]), done, overlap)
    if cut[:done] != plan[:done]:
        return False
    plan[done:] = cut[done:]
    del seg[done:]
    return True


class StepControl:
    """What the trainer asks at each step boundary: stop now (preemption)? must all stop
    (non-finite value under policy stop)? Owns the signal handler, the NaN guard and the vote.

    Contract: every rank of `comm` calls `end_of_step` with the same `step` sequence and
    `close` at the same point. The vote is pipelined (dpsgs.reliability.votes.LaggedVote, lag K+1 steps)
    so training does not wait for it: a signal or a NaN stops every rank 2(K+1) steps after
    the step it was seen at, all at the same step. `lag=0` votes synchronously."""

    def __init__(self, comm: Any, *, rank: int, stages: int, timeout: float = 300.0,
                 warn_after: float = 60.0, on_nonfinite: str = "stop", lag: int | None = None,
                 signals: Sequence[int] = DEFAULT_SIGNALS) -> None:
        self.rank = rank
        self.guard = FiniteGuard(on_nonfinite, rank, rank % stages)
        self.preempt = PreemptionHandler(signals).install()
        self.vote = StepVote(comm, 2, timeout, warn_after,
                             label=lambda r: rank_label(r, stages))
        self.lag = stages + 1 if lag is None else lag
        self.lagged = LaggedVote(self.vote, self.lag) if self.lag > 0 else None
        self.stop_signal: str | None = None
        self.step = 0                    # the step being executed (kept by `attach`)
        self.cut = False                 # a running segment was cut short by a stop

    def end_of_step(self, step: int) -> str | None:
        """None to go on; the signal name (e.g. 'SIGTERM') when any rank was asked to stop.
        Raises NonFiniteError on every rank when any rank found a NaN/Inf (policy stop)."""
        bad = self.rank + 1 if self.guard.pending is not None else 0
        mine = [self.preempt.signum, bad]
        if self.lagged is None:
            decided = self.vote.vote(step, mine)
        else:
            decided = self.lagged.step(step, mine)
            if decided is None:
                return self.stop_signal
        signum, culprit = decided
        if culprit:
            raise self.guard.error(step, culprit - 1)
        if signum and self.stop_signal is None:
            self.stop_signal = signal_name(signum)
            if self.rank == 0:
                print(f"dpsgs: {self.stop_signal} received: stopping at step {step}, "
                      "flushing and writing a checkpoint (resume with --resume auto)",
                      file=sys.stderr, flush=True)
        return self.stop_signal

    def attach(self, worker: Any) -> None:
        """Hook this control into a dpsgs.pipeline.executor.StageWorker instance (no change to its code):

        - after each step's own callback, vote (`end_of_step`); when a stop is agreed, cut
          the running segment there: the rest of the plan becomes the flush of the batches
          already admitted (the fdg plan is a pure function of the batch count, and the two
          plans agree on every step so far), so the worker drains and returns at once;
        - the last stage's loss and every stage's gradients (after the all-reduce, just
          before the optimizer step) pass the NaN/Inf guard; a non-finite update is skipped.
        """
        control = self

        def run_fdg(plan: list, seg: list, step0: int, on_step: Any = None) -> Any:
            def tick(step: int) -> None:
                if on_step is not None:
                    on_step(step)
                control.step = step + 1
                if control.end_of_step(step) and cut_segment(plan, seg, step - step0 + 1,
                                                             worker.cfg.overlap):
                    control.cut = True
            control.step = step0
            return inner_fdg(plan, seg, step0, tick)

        def run_sync(seg: list, step0: int, on_step: Any = None) -> Any:
            def tick(step: int) -> None:
                if on_step is not None:
                    on_step(step)
                control.step = step + 1
                if control.end_of_step(step) and step - step0 + 1 < len(seg):
                    del seg[step - step0 + 1:]        # ends the worker's loop after this step
                    control.cut = True
            control.step = step0
            return inner_sync(seg, step0, tick)

        inner_fdg, inner_sync = worker.run_fdg, worker.run_sync
        worker.run_fdg, worker.run_sync = run_fdg, run_sync

        compute, guard = worker.compute, self.guard
        inner_loss = compute.loss

        def loss(*args: Any, **kwargs: Any) -> Any:
            value, correct = inner_loss(*args, **kwargs)
            guard.check(control.step, "loss", [("loss", torch.tensor(value))])
            return value, correct
        compute.loss = loss

        opt = worker.optimizer
        if opt is not None:
            inner_step = opt.step
            names = [(n, p) for n, p in compute.module.named_parameters() if p.requires_grad]

            def step(*args: Any, **kwargs: Any) -> Any:
                if guard.check(control.step, "gradient", [(n, p.grad) for n, p in names]):
                    return inner_step(*args, **kwargs)
                return None                           # skip this update (both policies)
            opt.step = step

    def bounded(self, comm: Any, what: str) -> BoundedComm:
        """`comm` with deadline-checked collectives (see BoundedComm); `what` names the use."""
        return BoundedComm(comm, self.vote, what)

    def close(self) -> None:
        """Collective: finish the rounds in flight, restore the signal handlers."""
        if self.lagged is not None:
            self.lagged.drain()
        self.preempt.uninstall()
        self.vote.free()
